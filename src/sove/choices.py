"""The values of the config's string keys, defined once and without torch.

:func:`sove.config.load_config` checks a config against these tuples before torch is imported (a
typo is answered in well under a second); the module that implements each choice imports its tuple
from here (named after each tuple). The concept settings' values (``loss.*.label_mode``,
``loss.search_dtype``) are in :mod:`sove.method.settings`.
"""

#: ``method``, the objective: :data:`sove.method.registry.METHODS` (its keys, in this order).
METHODS = ("sove", "dino", "ibot")
#: ``data.source``: :func:`sove.data.sources.build_source`; ``python`` = a dataset given to ``sove.pretrain``
#: (:mod:`sove.data.python_source`), recorded in a run's config but not readable from it.
SOURCES = ("fashion_mnist", "folder", "shards", "python")
#: ``data.on_error``, an unreadable image: :class:`sove.data.multicrop.SSLDataset`.
ON_ERROR = ("skip", "raise")
#: ``data.augment_on``, where the views are made: :func:`sove.train.builders.resolve_augment_on`.
AUGMENT_ON = ("auto", "loader", "device")
#: ``mask.mode``: :func:`sove.data.masking.build_mask_generator`.
MASK_MODES = ("blockwise", "random")
#: ``model.global_pool``, the image representation for the CLS loss and evaluation (Tab. B.2):
#: :class:`sove.models.backbone.MaskedViT`.
GLOBAL_POOLS = ("cls", "mean_patch")
#: ``trainer.accelerator`` and ``trainer.precision``: Lightning Fabric's names
#: (:func:`sove.preflight.check_trainer_device`, :func:`sove.train.builders.resolve_precision`).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
#: ``trainer.loggers``: :func:`sove.train.loggers.build_loggers`.
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
#: ``trainer.on_nonfinite``, what a NaN/inf loss or gradient does: :class:`sove.train.diagnostics.Diagnostics`.
ON_NONFINITE = ("stop", "skip")
