"""megamod.data.datasets / schema / records / collate: every bad input named by file:line, skip mode, batches."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megamod.data.collate import Collator, PairBatch
from megamod.data.datasets import BadSampleError, FileDataset, MixedDataset, PairSample, Sample, Skipped
from megamod.data.images import ImageProcessor
from megamod.data.records import DataError
from megamod.data.sampler import MixtureSampler, StatefulLoader
from megamod.data.templates import IGNORE_INDEX
from megamod.data.tokenizer import load_tokenizer
from tests.data_fixtures.builders import build_hf, write_image, write_json, write_jsonl


def conv(sample_id, image, *values):
    turns = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]
    return {"id": sample_id, **({"image": image} if image is not None else {}), "conversations": turns}


GOOD = conv("good", "a.png", "<image>\nWhat color is the circle?", "Red.")
# (row, reason) in file order; line k + 1 of the JSONL file. Scan-time problems unless marked "access".
ROWS = [
    (GOOD, None),
    (conv("missing", "nope.png", "<image>\nWhat?", "Red."), "image not found: {d}/nope.png"),
    (conv("junk", "junk.png", "<image>\nWhat?", "Red."), "access: cannot read image {d}/junk.png"),
    ('{"id": "broken", "conversations": [', "malformed JSON line"),
    ({"id": "nofield", "image": "a.png"}, 'missing field "conversations"'),
    (conv("two", "a.png", "<image>\n<image>\nWhat?", "Red."), "2 <image> placeholder(s) for 1 image(s)"),
    (conv("none", "a.png", "What?", "Red."), "0 <image> placeholder(s) for 1 image(s)"),
    (conv("textimg", None, "<image>\nWhat?", "Red."), "1 <image> placeholder(s) for 0 image(s)"),
    (conv("long", "a.png", "<image>\n" + "What color is the circle? " * 40, "Red."), "access: exceed max length 128"),
    (conv("empty", "a.png", "<image>\nWhat?", "  "), "empty answer in turn 1"),
    (conv("role", "a.png", "<image>\nWhat?", "Red.", "And?"), "must alternate human, gpt"),
    ({"id": "badimg", "image": 7, "conversations": GOOD["conversations"]}, 'field "image" must be an image path'),
    (conv("text", None, "How many sides does a triangle have?", "Three."), None),
    (conv("multi", ["a.png", "b.png"], "<image>\nLeft?", "Red.", "<image>\nAnd right?", "Blue."), None),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    write_image(os.path.join(d, "a.png"), (24, 16), (200, 30, 30))
    write_image(os.path.join(d, "b.png"), (16, 30), (30, 30, 200))
    with open(os.path.join(d, "junk.png"), "wb") as f:
        f.write(b"\x89PNG but not really")
    tok = load_tokenizer(build_hf(os.path.join(d, "tokenizer")))
    jsonl = write_jsonl(os.path.join(d, "conv.jsonl"), [row for row, _ in ROWS])
    return {"dir": d, "tok": tok, "jsonl": jsonl}


def dataset(env, path, **kw):
    kw = {"max_length": 128, "image_processor": ImageProcessor(32), **kw}
    return FileDataset(path, env["tok"], **kw)


def expected(env, path, rows, *, access):
    out = []
    for line, (row, reason) in enumerate(rows, 1):
        if reason and reason.startswith("access: ") == access:
            sample_id = row["id"] if isinstance(row, dict) else None
            where = f"{path}:{line}" + (f" (id={sample_id})" if sample_id else "")
            out.append((where, reason.removeprefix("access: ").format(d=env["dir"])))
    return out


def assert_reported(bads, wanted):
    assert len(bads) == len(wanted), [str(b) for b in bads]
    for bad, (where, reason) in zip(bads, wanted):
        assert str(bad).startswith(where + ": ") and reason in str(bad), (str(bad), where, reason)


def test_error_mode_lists_every_bad_sample_at_start(env):
    with pytest.raises(DataError) as e:
        dataset(env, env["jsonl"])
    message = str(e.value)
    wanted = expected(env, env["jsonl"], ROWS, access=False)
    assert f"{len(wanted)} bad sample(s)" in message
    for where, reason in wanted:
        assert f"{where}: " in message and reason in message
    assert "on_bad_sample='skip'" in message


def test_error_mode_on_access_names_file_and_line(env):
    rows = [(GOOD, None), ROWS[2], ROWS[8]]
    path = write_jsonl(os.path.join(env["dir"], "access.jsonl"), [r for r, _ in rows])
    ds = dataset(env, path)
    assert isinstance(ds[0], Sample)
    for k, (where, reason) in zip((1, 2), expected(env, path, rows, access=True)):
        with pytest.raises(BadSampleError) as e:
            ds[k]
        assert str(e.value).startswith(where + ": ") and reason in str(e.value)


def test_skip_mode_counts_and_reports_everything(env):
    ds = dataset(env, env["jsonl"], on_bad_sample="skip")
    assert_reported(list(ds.report), expected(env, env["jsonl"], ROWS, access=False))
    good = [r for r, reason in ROWS if reason is None or reason.startswith("access")]
    assert len(ds) == len(good)
    collator = Collator(env["tok"].image_id, env["tok"].pad_id, image_size=32)
    loader = StatefulLoader(ds, MixtureSampler([len(ds)], shuffle=False, num_epochs=1), collator, micro_batch_size=2)
    batches = list(loader)
    assert sum(b.num_requested for b in batches) == len(ds)
    kept = [i for b in batches for i in b.sample_ids]
    assert kept == ["good", "text", "multi"]
    runtime = [b for b in loader.report if b not in ds.report.samples]
    assert_reported(runtime, expected(env, env["jsonl"], ROWS, access=True))
    assert len(loader.report) == sum(1 for _, reason in ROWS if reason)
    assert "by reason:" in loader.report.summary()


def test_json_list_locations_and_broken_list(env):
    rows = [(GOOD, None), ROWS[5], ROWS[9]]
    path = write_json(os.path.join(env["dir"], "list.json"), [r for r, _ in rows])
    ds = dataset(env, path, on_bad_sample="skip")
    lines = [ds.records.line(i) for i in range(len(ds.records))]
    text = Path(path).read_text().split("\n")
    assert [text[n - 1].strip() for n in lines] == ["{"] * 3 and lines[0] == 2
    assert [b.location for b in ds.report] == [f"{path}:{lines[1]}", f"{path}:{lines[2]}"]
    broken = os.path.join(env["dir"], "broken.json")
    with open(broken, "w") as f:
        f.write('[\n {"id": 1, "conversations": []},\n {"id": 2 "conversations": []}\n]\n')
    with pytest.raises(DataError, match=f"{broken}:3:11: malformed JSON list"):
        dataset(env, broken)


def test_good_sample_content(env):
    ds = dataset(env, env["jsonl"], on_bad_sample="skip")
    multi = ds[len(ds) - 1]
    assert multi.sample_id == "multi" and multi.location == f"{env['jsonl']}:{len(ROWS)}"
    assert multi.images.shape == (2, 3, 32, 32) and multi.images.dtype == torch.float32
    assert list(multi.text.tokens).count(env["tok"].image_id) == 2
    text_only = ds[len(ds) - 2]
    assert text_only.images.shape == (0, 3, 32, 32)


def test_pairs_layouts(env):
    tok = env["tok"]
    rows = [
        ({"idx": 11, "image_path": "a.png", "question": "What color is the circle?", "chosen": "Red.",
          "rejected": "Blue."}, None),
        ({"id": "conv", "image": "a.png",
          "chosen": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}],
          "rejected": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Blue."}]}, None),
        ({"id": "same", "image": "a.png", "question": "Q?", "chosen": "Red.", "rejected": "Red."},
         "chosen and rejected answers are identical"),
        ({"id": "norej", "image": "a.png", "question": "Q?", "chosen": "Red."}, 'missing field "rejected"'),
        ({"id": "emptyc", "image": "a.png", "question": "Q?", "chosen": "", "rejected": "Red."},
         "empty chosen answer"),
        ({"id": "diffq", "image": "a.png",
          "chosen": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "Red."}],
          "rejected": [{"from": "human", "value": "<image>\nB?"}, {"from": "gpt", "value": "Blue."}]},
         "must share their questions"),
    ]
    path = write_jsonl(os.path.join(env["dir"], "pairs.jsonl"), [r for r, _ in rows])
    ds = dataset(env, path, kind="pairs", on_bad_sample="skip")
    assert_reported(list(ds.report), expected(env, path, rows, access=False))
    flat, listed = ds[0], ds[1]
    assert isinstance(flat, PairSample) and flat.sample_id == "11" and flat.images.shape[0] == 1
    # RLAIF-V questions have no placeholder: "<image>\n" goes first; only the last answer is trained.
    assert tok.decode(flat.chosen.tokens).startswith(ds.template.system + " USER: <image>\nWhat color")
    assert tok.decode(flat.chosen.tokens[flat.chosen.targets]) == " Red.<|endoftext|>"
    assert tok.decode(flat.rejected.tokens[flat.rejected.targets]) == " Blue.<|endoftext|>"
    assert tok.decode(listed.rejected.tokens[listed.rejected.targets]) == " Blue.<|endoftext|>"


def test_tokenizer_without_image_token_is_a_setup_error(env, tmp_path):
    from megamod.data.tokenizer import TiktokenTokenizer

    plain = TiktokenTokenizer(str(tmp_path / "t.tiktoken"), {bytes([b]): b for b in range(256)},
                              {"<|endoftext|>": 256}, r"\S+|\s+")
    path = write_jsonl(os.path.join(env["dir"], "one.jsonl"), [GOOD])
    with pytest.raises(DataError, match="has no <image> token; add it with"):
        FileDataset(path, plain)


def test_collator_expands_images_and_shifts_labels(env):
    tok = env["tok"]
    ds = dataset(env, env["jsonl"], on_bad_sample="skip", num_image_tokens=4, template="plain", max_length=None)
    items = [ds[0], Skipped(ds.report.samples[0]), ds[0]]
    K, multiple = 4, 8
    batch = Collator(tok.image_id, tok.pad_id, num_image_tokens=K, pad_to_multiple_of=multiple, image_size=32)(items)
    text = items[0].text
    T = len(text.tokens) + K - 1
    assert batch.tokens.shape == (2, -(-T // multiple) * multiple) and batch.seq_length % multiple == 0
    assert batch.lengths.tolist() == [T, T] and batch.num_requested == 3 and len(batch.skipped) == 1
    row = batch.tokens[0]
    assert (row[:K] == tok.image_id).all() and row[K] == text.tokens[1] and (row[T:] == tok.pad_id).all()
    labels = batch.labels[0]
    assert (labels[:K - 1] == IGNORE_INDEX).all() and labels[K - 1] == text.tokens[1]  # last image slot -> caption
    assert labels[T - 2] == text.tokens[-1] and (labels[T - 1:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[K - 1:T - 1].numpy(), text.labels()[:-1])
    assert torch.equal(batch.loss_mask, (batch.labels != IGNORE_INDEX).float())
    assert batch.images.shape == (2, 3, 32, 32) and batch.image_sample_index.tolist() == [0, 1]
    assert torch.equal(batch.position_ids[1], torch.arange(batch.seq_length))


def test_collator_multi_image_and_text_only_rows(env):
    tok = env["tok"]
    ds = dataset(env, env["jsonl"], on_bad_sample="skip", max_length=None)
    text_only, multi = ds[len(ds) - 2], ds[len(ds) - 1]
    batch = Collator(tok.image_id, tok.pad_id, num_image_tokens=3, image_size=32)([text_only, multi])
    assert batch.image_sample_index.tolist() == [1, 1]
    assert int((batch.tokens[1] == tok.image_id).sum()) == 6 and int((batch.tokens[0] == tok.image_id).sum()) == 0
    assert batch.lengths.tolist() == [len(text_only.text.tokens), len(multi.text.tokens) + 4]


def test_pair_batch_shares_images_and_length(env):
    rows = [{"id": "p", "image": "a.png", "question": "Q?", "chosen": "Red.", "rejected": "A much longer wrong one."}]
    ds = dataset(env, write_jsonl(os.path.join(env["dir"], "p1.jsonl"), rows), kind="pairs")
    tok = env["tok"]
    batch = Collator(tok.image_id, tok.pad_id, num_image_tokens=5, pad_to_multiple_of=4, image_size=32)([ds[0]])
    assert isinstance(batch, PairBatch)
    assert batch.chosen.tokens.shape == batch.rejected.tokens.shape and batch.chosen.seq_length % 4 == 0
    assert batch.chosen.images is batch.rejected.images
    assert batch.chosen.loss_mask.sum() < batch.rejected.loss_mask.sum()


def test_mixture_of_files_through_worker_processes(env):
    """Two files mixed 3:1, read by two DataLoader workers: items come from the right file, bad ones are reported."""
    first = write_jsonl(os.path.join(env["dir"], "first.jsonl"), [conv(f"f{k}", "a.png", "<image>\nQ?", "A.")
                                                                  for k in range(6)])
    second = write_jsonl(os.path.join(env["dir"], "second.jsonl"), [conv(f"s{k}", None, "Q?", "A.") for k in range(4)]
                         + [ROWS[4][0]])
    mixed = MixedDataset([dataset(env, first), dataset(env, second, on_bad_sample="skip")])
    assert mixed.sizes == [6, 4] and len(mixed.report) == 1 and "second.jsonl:5" in str(mixed.report.samples[0])
    sampler = MixtureSampler(mixed.sizes, [3, 1], seed=0, epoch_size=8, num_epochs=2)
    tok = env["tok"]
    loader = StatefulLoader(mixed, sampler, Collator(tok.image_id, tok.pad_id, image_size=32), micro_batch_size=4,
                            num_workers=2)
    ids = [i for batch in loader for i in batch.sample_ids]
    assert len(ids) == 16 and sum(i.startswith("f") for i in ids) == 12
    assert len(set(i for i in ids[:8] if i.startswith("f"))) == 6  # each epoch draws the 6 before repeating
    assert loader.state_dict()["consumed"] == 16 and len(loader.report) == 1
    clone = pickle.loads(pickle.dumps(mixed))  # spawn-started workers get the dataset this way
    assert clone[0].sample_id == "f0" and torch.equal(clone[0].images, mixed[0].images)


def test_length_estimates_follow_words_and_expanded_images(env):
    rows = [conv("short", "a.png", "<image>\nWhat color?", "Red."),
            conv("text", None, "How many sides does a triangle have, all in all?", "Three sides."),
            conv("multi", ["a.png", "b.png"], "<image>\nLeft?", "Red.", "<image>\nAnd right?", "Blue, I think.")]
    path = write_jsonl(os.path.join(env["dir"], "lengths.jsonl"), rows)
    ds = dataset(env, path, num_image_tokens=5)
    # words ("<image>" is one) plus 4 more positions per image: 4 + 4; 12; 9 + 2 x 4
    assert ds.lengths.tolist() == [8, 12, 17]
    collator = Collator(env["tok"].token_to_id("<image>"), env["tok"].pad_id, num_image_tokens=5)
    expanded = [collator.expanded_length(ds.text_item(k)[1]) for k in range(3)]
    assert np.argsort(ds.lengths).tolist() == np.argsort(expanded).tolist()  # orders as the model's positions do
    pairs = write_jsonl(os.path.join(env["dir"], "pair_lengths.jsonl"),
                        [{"id": "p", "image": "a.png", "question": "What color?", "chosen": "Red.",
                          "rejected": "A deep blue, surely."}])
    # the longer side counts: "<image>\nWhat color?" (3 words) + the rejected answer (4) + the image's 4 more
    pair_ds = dataset(env, pairs, kind="pairs", num_image_tokens=5)
    assert pair_ds.lengths.tolist() == [3 + 4 + 4]
    assert MixedDataset([ds, pair_ds]).lengths.tolist() == [8, 12, 17, 11]
