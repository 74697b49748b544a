"""Revisited Oxford/Paris retrieval: hand-computed AP / mP@k, a generated dataset end to end, input errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sove.cli import build_parser, main
from sove.errors import DataError, SoveError
from sove.eval.encoder import FrozenBackbone
from sove.eval.retrieval import average_precision, evaluate_retrieval, revisited_metrics


def test_ap_and_precision_computed_by_hand():
    # Database of 8 images, 3 queries with fixed rankings.
    gnd = [
        {"easy": [0], "hard": [3], "junk": [5], "bbx": [0, 0, 1, 1]},
        {"easy": [], "hard": [2, 7], "junk": [], "bbx": [0, 0, 1, 1]},
        {"easy": [6], "hard": [], "junk": [1], "bbx": [0, 0, 1, 1]},
    ]
    ranking = np.array([[3, 5, 1, 0, 2, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7], [1, 6, 0, 2, 3, 4, 5, 7]])
    # Query A, Medium: positives {0, 3}, junk {5}. 3 at rank 0; 5 (junk) dropped; 0 at rank 3 -> 2.
    #   hit 1 (r=0): (1 + 1/1)/2 * 1/2 = 1/2;  hit 2 (r=2): (1/2 + 2/3)/2 * 1/2 = 7/24;  AP = 19/24.
    #   Hard: positives {3}, junk {5, 0}: 3 at rank 0 -> AP = 1.
    # Query B (no easy, no junk): positives {2, 7} at ranks 2 and 7.
    #   hit 1 (r=2): (0/2 + 1/3)/2 * 1/2 = 1/12;  hit 2 (r=7): (1/7 + 2/8)/2 * 1/2 = 11/112;
    #   AP = 1/12 + 11/112 = 61/336, same for Hard.
    # Query C, Medium: positive {6}, junk {1} at rank 0 dropped -> 6 at rank 0 -> AP = 1.
    #   Hard: no positive -> not counted.
    ap_a, ap_b = 19 / 24, 61 / 336
    r = revisited_metrics(ranking, gnd)
    assert r["medium"]["mAP"] == pytest.approx(100 * (ap_a + ap_b + 1) / 3)
    assert r["hard"]["mAP"] == pytest.approx(100 * (1 + ap_b) / 2)
    assert r["medium"]["ap"] == pytest.approx([100 * ap_a, 100 * ap_b, 100.0])
    assert r["hard"]["ap"][2] is None and r["hard"]["num_queries"] == 2
    # mP@k, 1-based ranks after junk removal, k' = min(k, rank of the last positive):
    #   A: ranks [1, 3] -> P@1 = 1/1, P@5 = P@10 = 2/3 (k' = 3)
    #   B: ranks [3, 8] -> P@1 = 0/1, P@5 = 1/5, P@10 = 2/8 (k' = 8)
    #   C: ranks [1]    -> 1, 1, 1
    assert r["medium"]["mP@1"] == pytest.approx(100 * 2 / 3)
    assert r["medium"]["mP@5"] == pytest.approx(100 * (2 / 3 + 1 / 5 + 1) / 3)
    assert r["medium"]["mP@10"] == pytest.approx(100 * (2 / 3 + 2 / 8 + 1) / 3)


def test_ap_edge_cases():
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert np.isnan(average_precision(np.array([], dtype=int), 0))
    # A positive never retrieved (not in the ranking) costs its share: one of two found at rank 0.
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class MeanColour(torch.nn.Module):
    """Stub backbone: global feature = mean normalised colour, patch tokens = 4x4 average colour (row-major)."""

    token_stride = 4

    def forward(self, x):
        patches = torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # (batch, rows * cols, channels)
        return {"global": x.mean(dim=(2, 3)), "patches": patches}


def colour_encoder() -> FrozenBackbone:
    return FrozenBackbone(MeanColour(), image_size=16, token_stride=4, mean=[0.5] * 3, std=[0.25] * 3)



def _solid(path, colour, size=(32, 24), right=None):
    pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    if right is not None:  # the left quarter keeps ``colour``
        pixels[:, size[0] // 4:] = right
    Image.fromarray(pixels).save(path, quality=95)


def make_dataset(root, gnd_name="toyox"):
    """Database: blue_a, blue_b, red_a, red_b, green_a; two queries: left quarter red / green, the
    rest blue (so the uncropped query looks mostly blue); the query box is the left quarter."""
    (root / "jpg").mkdir(parents=True)
    imlist = ["blue_a", "blue_b", "red_a", "red_b", "green_a"]
    for nm in imlist:
        _solid(root / "jpg" / f"{nm}.jpg", COLOURS[nm.split("_")[0]])
    _solid(root / "jpg" / "q_red.jpg", COLOURS["red"], right=COLOURS["blue"])
    _solid(root / "jpg" / "q_green.jpg", COLOURS["green"], right=COLOURS["blue"])
    box = [0, 0, 6, 24]  # left quarter, minus the JPEG-blurred border
    gnd = [{"easy": [2], "hard": [3], "junk": [], "bbx": box},
           {"easy": [], "hard": [4], "junk": [0], "bbx": box}]
    with open(root / f"gnd_{gnd_name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": ["q_red", "q_green"], "gnd": gnd}, f)
    return root


def test_end_to_end_generated_dataset(tmp_path):
    root = make_dataset(tmp_path / "toyox")
    out = tmp_path / "res.json"
    r = evaluate_retrieval(root, out=out, encoder=colour_encoder())
    # Cropped queries are pure red / green: their positives come first -> perfect scores.
    assert r["medium"]["mAP"] == pytest.approx(100.0) and r["hard"]["mAP"] == pytest.approx(100.0)
    assert r["medium"]["mP@1"] == pytest.approx(100.0)
    assert r["dataset"] == "toyox" and r["num_database"] == 5 and r["num_queries"] == 2
    assert out.is_file()
    assert r["query_crop"] == "bbox"


def test_query_crop_none_encodes_whole_queries(tmp_path):
    # DINO's convention: whole queries, 3/4 blue. Normalised colours red (2,-2,-2), blue (-2,-2,2),
    # green (-2,2,-2); red query mean (-1,-2,1): cosine 0.94 with blue, 0 with red, < 0 with green;
    # green query mean (-2,-1,1): 0.94 with blue, 0 with green, < 0 with red.
    #   red, Medium (positives red_a, red_b): blues first, reds at ranks 2, 3:
    #     AP = (0/2 + 1/3)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 7/24.
    #   red, Hard (positive red_b, junk red_a): red_b at rank 2 -> AP = (0/2 + 1/3)/2 = 1/6.
    #   green, Medium = Hard (positive green_a, junk blue_a): green_a at rank 1 -> AP = (0 + 1/2)/2 = 1/4.
    root = make_dataset(tmp_path / "toyox")
    with open(root / "gnd_toyox.pkl", "rb") as f:
        gt = pickle.load(f)
    for g in gt["gnd"]:
        del g["bbx"]  # not needed without the crop
    with open(root / "gnd_toyox.pkl", "wb") as f:
        pickle.dump(gt, f)
    r = evaluate_retrieval(root, out=tmp_path / "r.json", query_crop="none", encoder=colour_encoder())
    assert r["medium"]["ap"] == pytest.approx([100 * 7 / 24, 100 / 4])
    assert r["hard"]["ap"] == pytest.approx([100 / 6, 100 / 4])
    assert r["query_crop"] == "none"
    with pytest.raises(DataError, match=r"gnd\[0\] has no 'bbx' \(query boxes are needed by --query-crop bbox\)"):
        evaluate_retrieval(root, out=tmp_path / "r.json", encoder=colour_encoder())
    with pytest.raises(SoveError, match="query_crop must be one of bbox, none, not 'box'"):
        evaluate_retrieval(root, out=tmp_path / "r.json", query_crop="box", encoder=colour_encoder())


def test_cli_query_crop_switch():
    parse = build_parser().parse_args
    assert parse(["eval", "retrieval", "--backbone", "b.json", "--data", "d"]).query_crop == "bbox"
    base = ["eval", "retrieval", "--backbone", "b.json", "--data", "d", "--query-crop"]
    assert parse(base + ["none"]).query_crop == "none"
    with pytest.raises(SystemExit):
        parse(base + ["box"])


def test_missing_ground_truth_file(tmp_path):
    root = make_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="gnd_roxford5k.pkl"):
        evaluate_retrieval(root, name="roxford5k", out=tmp_path / "r.json", encoder=colour_encoder())
    (root / "gnd_toyox.pkl").unlink()
    with pytest.raises(DataError, match="no gnd_<name>.pkl"):
        evaluate_retrieval(root, out=tmp_path / "r.json", encoder=colour_encoder())


def test_images_missing_or_count_mismatch(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "jpg" / "red_b.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) listed in .*gnd_toyox.pkl.*red_b.jpg"):
        evaluate_retrieval(root, out=tmp_path / "r.json", encoder=colour_encoder())
    root = make_dataset(tmp_path / "e")
    with open(root / "gnd_toyox.pkl", "rb") as f:
        gt = pickle.load(f)
    gt["gnd"] = gt["gnd"][:1]
    with open(root / "gnd_toyox.pkl", "wb") as f:
        pickle.dump(gt, f)
    with pytest.raises(DataError, match="2 query images.*1 ground-truth entries"):
        evaluate_retrieval(root, out=tmp_path / "r.json", encoder=colour_encoder())
    gt["gnd"] = [{"easy": [9], "hard": [], "junk": [], "bbx": [0, 0, 4, 4]}] * 2
    with open(root / "gnd_toyox.pkl", "wb") as f:
        pickle.dump(gt, f)
    with pytest.raises(DataError, match="index 9 but imlist has 5 images"):
        evaluate_retrieval(root, out=tmp_path / "r.json", encoder=colour_encoder())


def test_cli_reports_a_missing_ground_truth_file(tmp_path, capsys):
    root = make_dataset(tmp_path / "d")
    (root / "gnd_toyox.pkl").unlink()
    assert main(["eval", "retrieval", "--backbone", str(tmp_path / "none.json"), "--data", str(root)]) == 2
    assert "gnd_<name>.pkl" in capsys.readouterr().err


def test_paper_tables_cited_the_right_way_round():
    # Paper: Tab. 4 = DAVIS-2017 video segmentation, Tab. 5 = revisited Oxford/Paris retrieval.
    import sove.eval.retrieval
    import sove.eval.video

    assert "Tab. 5" in sove.eval.retrieval.__doc__.splitlines()[0]
    assert "Tab. 4" in sove.eval.video.__doc__.splitlines()[0]
    subparsers = build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0]
    helps = {a.dest: a.help for a in subparsers._choices_actions}
    assert "(Tab. 5)" in helps["retrieval"] and "(Tab. 4)" in helps["video"]
