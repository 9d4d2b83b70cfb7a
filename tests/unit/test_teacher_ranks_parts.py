"""The parts of the teacher on its own ranks that need no second process: the recipe's checks, who sends to whom,
and the rows' layout (header, vocabulary columns, scatter back into [B, S, ...])."""
import pytest
import torch

from megamod.loading.microbatch import MicroBatch

GOOD = {"stage": "d2s", "student": "s", "out": "o", "data": {"train": [{"path": "x.json"}]},
        "teacher": {"ckpt": "t", "ranks": 4, "parallel": {"tp": 2}}}


def _with(**teacher):
    return {**GOOD, "teacher": {**GOOD["teacher"], **teacher}}


def test_recipe_forms_and_checks():
    from megamod.training.config import ConfigError, TeacherParallel, TeacherRanksConfig, load_config

    cfg = load_config(base=GOOD)
    assert cfg.teacher == TeacherRanksConfig(ckpt="t", ranks=4, parallel=TeacherParallel(tp=2, pp=1))
    assert (cfg.teacher.send, cfg.teacher.topk, cfg.teacher.dtype) == ("topk", 64, "bfloat16")
    bad = [(_with(ranks=0), "teacher.ranks must be >= 1"),
           (_with(ranks=5), r"teacher.ranks 5 is not a multiple of teacher.parallel tp\*pp = 2\*1"),
           (_with(ranks=6, parallel={"tp": 2, "pp": 2}), r"teacher.ranks 6 is not a multiple of .* = 2\*2"),
           (_with(parallel={"tp": 2, "pp": 0}), "teacher.parallel.pp must be >= 1"),
           (_with(send="logits"), r"teacher.send must be one of \['topk', 'full'\]"),
           (_with(dtype="float16"), "teacher.dtype must be float32 or bfloat16"),
           (_with(topk=0), "teacher.topk must be >= 1"),
           ({**_with(), "loss": {"kd": "reverse"}}, "teacher.send=topk sends temperature-1 .* use teacher.send=full"),
           ({**_with(), "stage": "sft"}, "stage sft has no teacher"),
           ({**GOOD, "teacher": {"ckpt": "t", "rank": 2}}, r"keys \['ckpt', 'rank'\] fit none of its forms")]
    for recipe, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(base=recipe)
    assert load_config(base=_with(parallel={"tp": 2, "pp": 2})).teacher.parallel == TeacherParallel(tp=2, pp=2)
    # exact KD at any temperature goes with send: full; preference pairs ignore the top-k settings
    exact = load_config(base={**_with(send="full"), "loss": {"kd": "reverse", "temperature": 2.0}})
    assert exact.teacher.send == "full"
    assert load_config(base={**_with(topk=0), "stage": "preference",
                             "data": {"train": [{"path": "p.jsonl"}]}}).teacher.topk == 0


def _roles(side, first_rank, dp, tp, pp, vocab_rows=12):
    return [{"side": side, "rank": first_rank + (d * pp + s) * tp + t, "dp": d, "dp_size": dp, "tp": t, "tp_size": tp,
             "first": s == 0, "last": s == pp - 1, "vocab_rows": vocab_rows}
            for d in range(dp) for s in range(pp) for t in range(tp)]


def test_routes_pair_student_ranks_with_teacher_replicas():
    from megamod.training.teacher_ranks import routes

    # teacher: 2 replicas of TP=2 on ranks 0-3; student: DP=3 x TP=2 x PP=2 on ranks 4-15
    r = routes.build(_roles("teacher", 0, 2, 2, 1) + _roles("student", 4, 3, 2, 2))
    assert (r.student_dp, r.teacher_dp, r.student_tp) == (3, 2, 2)
    assert [r.replica(d) for d in range(3)] == [0, 1, 0] and r.served(0) == [0, 2] and r.served(1) == [1]
    assert r.members == {0: [0, 1], 1: [2, 3]} and r.rows_sender == {0: 0, 1: 2}
    assert r.sender == {0: 4, 1: 8, 2: 12}  # first stage, tensor-parallel rank 0
    assert r.receivers[0] == [(6, 0), (7, 1)]  # the last stage's tensor-parallel ranks
    assert r.shards == {0: [(0, 0, 6), (1, 6, 12)], 1: [(2, 0, 6), (3, 6, 12)]}  # 12 padded ids over TP=2


def test_full_vocabulary_pieces_come_from_each_teacher_shard():
    from megamod.training.teacher_ranks import routes, rows

    # teacher TP=3 over 24 padded ids (ranks 0-2, shards of 8) + teacher PP=2 in front (ranks 3-5 are the last
    # stage); student TP=2 over 20 padded ids; the tokenizer has 17 ids
    r = routes.build(_roles("teacher", 0, 1, 3, 2, vocab_rows=24) + _roles("student", 6, 1, 2, 1, vocab_rows=20))
    assert r.shards == {0: [(3, 0, 8), (4, 8, 16), (5, 16, 24)]}
    lo, hi = rows.columns(0, 2, 20, 17)
    assert (lo, hi) == (0, 10) and r.pieces(0, lo, hi) == [(3, 0, 8), (4, 8, 10)]
    lo, hi = rows.columns(1, 2, 20, 17)
    assert (lo, hi) == (10, 17) and r.pieces(0, lo, hi) == [(4, 10, 16), (5, 16, 17)]
    assert r.pieces(0, 5, 5) == []  # a student shard of padding only needs nothing
    # a teacher narrower than the student's columns cannot cover them
    narrow = routes.build(_roles("teacher", 0, 1, 2, 1, vocab_rows=8) + _roles("student", 2, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r"do not cover the student's columns \[0, 10\)"):
        narrow.pieces(0, 0, 10)


def _micro_batch(mask_BS):
    B, S = mask_BS.shape
    tokens = torch.arange(B * S).reshape(B, S)
    return MicroBatch(tokens=tokens, position_ids=tokens, labels=tokens, loss_mask=mask_BS.float(), images=None,
                      num_tokens=B * S, num_images=0, padding=torch.zeros_like(mask_BS))


def test_rows_round_trip_and_header():
    from megamod.training.teacher_ranks import rows

    mask_BS = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    mb = _micro_batch(mask_BS)
    head = rows.header(5, 1, 0, mb, ["a", 7])
    assert head[:4].tolist() == [5, 1, 0, 4] and head.numel() == 6
    assert not torch.equal(head, rows.header(5, 1, 0, mb, ["a", 8]))  # another sample: another header
    # vocabulary columns of each student TP shard below the tokenizer's size (padded 12 over 3 ranks, 10 ids)
    assert [rows.columns(t, 3, 12, 10) for t in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert rows.columns(1, 2, 12, 5) == (6, 6)  # a shard of padding only gets nothing
    # full: each position's logits come back at its place, zeros elsewhere and in the padded columns
    logits_NC = torch.randn(4, 2)
    got = rows.scatter("conversations", "full", [logits_NC], mb, width=4).logits_BSv
    assert got.shape == (2, 4, 4) and torch.equal(got[mask_BS][:, :2], logits_NC)
    assert not got[~mask_BS].any() and not got[..., 2:].any()
    # top-k
    ids_NK, logprobs_NK, tail_N = torch.randint(0, 9, (4, 3), dtype=torch.int32), torch.randn(4, 3), torch.randn(4)
    c = rows.scatter("conversations", "topk", [ids_NK, logprobs_NK, tail_N], mb, width=4)
    assert torch.equal(c.ids_BSK[mask_BS], ids_NK.long()) and torch.equal(c.logprobs_BSK[mask_BS], logprobs_NK)
    assert torch.equal(c.log_tail_BS[mask_BS], tail_N) and not c.ids_BSK[~mask_BS].any()
    shapes = rows.specs("conversations", "topk", 4, 0, 3, torch.bfloat16, torch.float32, 2)
    assert shapes == [((4, 3), torch.int32), ((4, 3), torch.bfloat16), ((4,), torch.float32)]
    assert rows.specs("pairs", "topk", 4, 2, 3, torch.bfloat16, torch.float32, 2) == [((4,), torch.float64)]
