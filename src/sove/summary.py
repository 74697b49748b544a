"""``sove summary RUN``: the k-NN results of a run side by side, with the checkpoint each came from."""

from __future__ import annotations

from pathlib import Path

from sove.errors import SoveError

#: k-NN result files shown by ``sove summary`` and their row labels.
KNN_ROWS = (("knn.json", "SOVE (trained teacher)"), ("knn_random_init.json", "random init (same ViT)"),
            ("knn_pixels.json", "raw pixels"))


def summary_table(run_dir: str | Path) -> str:
    """Markdown table of the k-NN results found in ``RUN_DIR/eval`` (trained, random init, pixels).

    The last column is the checkpoint step each result was computed at ("—" for the baselines that
    use no checkpoint), marked ``(stale)`` when it differs from ``checkpoints/last.pt``; below the
    table one line per stale result in ``RUN_DIR/eval`` (any protocol) says why and how to recompute
    it (:func:`sove.eval.provenance.review_results`).

    Raises:
        SoveError: no k-NN result in ``RUN_DIR/eval``.
    """
    from sove.eval.provenance import review_results

    results, stale, notes = review_results(run_dir)
    rows = []
    for name, label in KNN_ROWS:
        r = results.get(name)
        if r is None:
            continue
        step = r.get("checkpoint_step", "?")
        at = "—" if step is None and r.get("weights_sha256") is None else str(step)
        at += " (stale)" if name in stale else ""
        rows.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r["top1"].values())
                    + f" | **{r['best_top1']:.2f}** | {at} |")
        ks = list(r["top1"])
    if not rows:
        raise SoveError(f"no k-NN results in '{Path(run_dir) / 'eval'}'; run `sove eval knn --run {run_dir}` first")
    head = "| features | " + " | ".join(f"k={k}" for k in ks) + " | best top-1 | checkpoint step |"
    return "\n".join([head, "|" + "---|" * (len(ks) + 3)] + rows + notes)
