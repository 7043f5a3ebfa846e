"""PIE-Bench's mapping_file.json as translate input: items, bracketed words -> token spans, results.

One small mapping file covers a replacement, an addition, a deletion (with and without a usable
blended word), a multi-word bracket group and two malformed entries. The end-to-end run uses the
tiny model with 3 DDIM steps (the fewest allowed) at 32x32: one compiled program for every item,
plain DDIM (the cheapest to compile).
"""

import json
import os

import pytest
from PIL import Image

from csg_jax import prompts as P
from csg_jax.dataset import read_manifest, read_results
from csg_jax.editing.plans import plan_prompts
from csg_jax.errors import CSGError
from csg_jax.shapes.world import make_batch

ENTRIES = {
    "rep": {"image_path": "0_a/rep.png", "original_prompt": "a red [circle] on a blue background",
            "editing_prompt": "a red [square] on a blue background", "editing_instruction": "make the circle a square",
            "editing_type_id": "1", "blended_word": "circle square", "mask": [0, 4]},
    "add": {"image_path": "0_a/add.png", "original_prompt": "a cat on a red mat",
            "editing_prompt": "a cat [with a hat] on a red mat", "editing_instruction": "give the cat a hat",
            "editing_type_id": "2", "blended_word": "cat hat", "mask": []},
    "del": {"image_path": "0_a/del.png", "original_prompt": "a cat [with a hat] on a red mat",
            "editing_prompt": "a cat on a red mat", "editing_type_id": "3", "blended_word": "hat mat", "mask": []},
    "del2": {"image_path": "0_a/del2.png", "original_prompt": "a red [cat] on a mat",
             "editing_prompt": "a red on a mat", "editing_type_id": "3", "blended_word": "", "mask": []},
    "multi": {"image_path": "0_a/multi.png", "original_prompt": "a [red car] on the road",
              "editing_prompt": "a [blue truck] on the road", "editing_type_id": "0", "blended_word": "car truck",
              "mask": [10, 2]},
    "no_target": {"image_path": "0_a/x.png", "original_prompt": "a [cat]", "editing_type_id": "1", "mask": []},
    "bad_type": {"image_path": "0_a/y.png", "original_prompt": "a [cat]", "editing_prompt": "a [dog]",
                 "editing_type_id": "12", "mask": []},
}
GOOD = ("rep", "add", "del", "del2", "multi")


def _write(folder, images=True) -> str:
    """mapping_file.json + annotation_images/0_a/<id>.png (32x32 shapes-world pictures)."""
    path = os.path.join(folder, "mapping_file.json")
    with open(path, "w") as f:
        json.dump(ENTRIES, f)
    if images:
        os.makedirs(os.path.join(folder, "annotation_images", "0_a"), exist_ok=True)
        pics = make_batch(0, len(GOOD), size=32)["images"]
        for key, im in zip(GOOD, pics):
            Image.fromarray(im).save(os.path.join(folder, "annotation_images", ENTRIES[key]["image_path"]))
    return path


def test_mapping_file_items_keep_words_hints_labels_and_errors(tmp_path):
    path = _write(str(tmp_path))
    items = read_manifest(path)
    assert [it.id for it in items] == list(ENTRIES)  # file order, malformed ones in place
    by_id = {it.id: it for it in items}
    rep = by_id["rep"]
    assert rep.image == os.path.join(str(tmp_path), "annotation_images", "0_a", "rep.png")
    assert (rep.prompt, rep.target_prompt, rep.task) == ("a red circle on a blue background",
                                                         "a red square on a blue background", None)
    assert (rep.source_word, rep.target_words, rep.word_hints) == ("circle", "square", ("circle", "square"))
    assert dict(rep.extra) == {"editing_type_id": "1", "editing_instruction": "make the circle a square",
                               "blended_word": "circle square"}
    assert (by_id["add"].source_word, by_id["add"].target_words) == (None, "with a hat")
    assert (by_id["del"].source_word, by_id["del"].target_words) == ("with a hat", "")
    assert by_id["multi"].source_word == "red car"
    assert all(by_id[k].error is None for k in GOOD)
    assert "no 'editing_prompt' text" in by_id["no_target"].error and "no_target" in by_id["no_target"].error
    assert "editing_type_id '12'" in by_id["bad_type"].error
    # --images overrides the default folder; without annotation_images/ the mapping's folder is used
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert read_manifest(path, images=str(other))[0].image == os.path.join(str(other), "0_a", "rep.png")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert read_manifest(_write(str(bare), images=False))[0].image == os.path.join(str(bare), "0_a", "rep.png")
    with pytest.raises(CSGError, match="not a folder"):
        read_manifest(path, images=str(tmp_path / "missing"))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "a cat", "task": "cat2dog"}\n')
    with pytest.raises(CSGError, match="--images is for PIE-Bench"):
        read_manifest(str(jsonl), images=str(other))


def _plan(pipe, item):
    return plan_prompts(pipe, item.prompt, item.task, item.target_prompt, item.source_word,
                        target_words=item.target_words, word_hints=item.word_hints)


def test_bracketed_words_give_the_spans(tiny_sd1, tmp_path):
    tok = tiny_sd1.tokenizer
    items = {it.id: it for it in read_manifest(_write(str(tmp_path), images=False))}
    span = lambda prompt, words: P.token_span(tok, prompt, words)

    rep = _plan(tiny_sd1, items["rep"])
    assert (rep.source_word, rep.target_words, rep.warnings) == ("circle", "square", ())
    assert rep.source_span == span(rep.source_prompt, "circle") and rep.target_span == span(rep.target_prompt, "square")

    # addition: source word from blended_word, target span where the added words are (not at "cat")
    add = _plan(tiny_sd1, items["add"])
    assert add.source_word == "cat" and add.source_span == span(add.source_prompt, "cat")
    assert add.target_words == "with a hat" and add.target_span == span(add.target_prompt, "with a hat")
    assert add.target_span[0] != add.source_span[0]
    assert any("blended word" in w for w in add.warnings)

    # deletion: the bracketed phrase is the source span; the target is blended_word's "mat"
    dele = _plan(tiny_sd1, items["del"])
    assert dele.source_span == span(dele.source_prompt, "with a hat") and dele.source_span[1] - dele.source_span[0] >= 3
    assert dele.target_span == span(dele.target_prompt, "mat") and any("blended word" in w for w in dele.warnings)
    # deletion without a blended word: the span sits at the source word's position
    del2 = _plan(tiny_sd1, items["del2"])
    assert del2.target_words == "" and del2.target_span == (del2.source_span[0], del2.source_span[0] + 1)
    assert any("source word's position" in w for w in del2.warnings)

    multi = _plan(tiny_sd1, items["multi"])
    assert multi.source_span == span(multi.source_prompt, "red car")
    assert multi.target_span == span(multi.target_prompt, "blue truck") and multi.warnings == ()

    # an addition without hints falls back to the first differing word; separate groups use their first run
    first = plan_prompts(tiny_sd1, "a cat on a mat", target_prompt="a cat on a red mat", target_words="red")
    assert first.source_word == "mat" and any("first differing word" in w for w in first.warnings)
    assert first.target_span == span(first.target_prompt, "red")
    split = plan_prompts(tiny_sd1, "a red cat on a blue mat", target_prompt="a green cat on a pink mat",
                         source_word="red blue", target_words="green pink")
    assert split.source_span == span(split.source_prompt, "red")
    assert split.target_span == span(split.target_prompt, "green")
    assert sum("do not occur together" in w for w in split.warnings) == 2

    # without target_words nothing changes: the span sits at the source position, no warnings
    old = plan_prompts(tiny_sd1, "a cat on a mat", target_prompt="a cat on a red mat")
    assert (old.source_word, old.target_words, old.warnings) == ("mat", "red mat", ())


def test_translate_runs_a_mapping_file_and_records_edit_types(tmp_path, tiny_sd1_dir, capsys):
    from csg_jax.translate import main

    root = tmp_path / "pie"
    root.mkdir()
    path = _write(str(root))
    images = root / "annotation_images"
    os.rename(images, tmp_path / "imgs")  # --images names the folder explicitly
    out = tmp_path / "out"
    rc = main(["--manifest", path, "--images", str(tmp_path / "imgs"), "--model", tiny_sd1_dir, "--method", "ddim",
               "--steps", "3", "--size", "32", "--out", str(out), "--quiet"])
    assert rc == 3  # as for any manifest with failed items
    rows = {r["id"]: r for r in read_results(str(out))}
    assert set(rows) == set(ENTRIES)
    for key in GOOD:
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["editing_type_id"] == ENTRIES[key]["editing_type_id"]
        meta = json.load(open(os.path.join(str(out), key, "meta.json")))
        assert meta["dataset"]["editing_type_id"] == ENTRIES[key]["editing_type_id"]
        assert meta["dataset"]["blended_word"] == ENTRIES[key]["blended_word"]
    assert rows["add"]["warnings"]
    assert json.load(open(out / "add" / "meta.json"))["prompts"]["target_words"] == "with a hat"
    assert rows["no_target"]["status"] == "error" and "no 'editing_prompt' text" in rows["no_target"]["error"]
    assert rows["bad_type"]["status"] == "error" and "editing_type_id" in rows["bad_type"]["error"]
    assert main(["--images", str(tmp_path / "imgs"), "--input-dir", str(tmp_path / "imgs"), "--prompt", "a cat",
                 "--task", "cat2dog", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "--images goes with --manifest" in capsys.readouterr().err
