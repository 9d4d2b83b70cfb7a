"""A teacher and a student padded differently over one tokenizer, as LLaVA-MoD's Qwen2-7B (152064 rows) and
Qwen2-0.5B (151936 rows) over 151646 ids: tiny HF Qwen2 checkpoints with 128 and 32 rows past one tokenizer,
converted as a user would. The pair distils (d2d) at TP=1 and TP=2 with the same losses; its KD is transformers'
KL over the tokenizer's ids (the padding rows are random, as in real checkpoints: had they reached the loss, it
would differ); cache-teacher and cached KD use the tokenizer's vocabulary. A teacher, cache or tokenizer whose ids
mean other tokens (same size, two ids swapped) is refused, naming both tokenizers.
"""
import json
import os
import random
import shutil

import pytest
import torch

from tests.helpers import run_jobs, swap_token_ids, tiny_qwen2

PAD = {"teacher": 128, "student": 32}  # rows past the tokenizer
TOPK = 8


def _conversations(n: int) -> list:
    from megamod.data import synthetic as syn

    rows = []
    for j in range(n):
        q, a = syn.text_only(random.Random(f"pair-{j}"))
        rows.append({"id": f"t{j}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    return rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megamod import distributed
    from megamod.convert.checkpoint import TOKENIZER_FILES, hf_to_megamod
    from megamod.data.synthetic_writer import train_tokenizer
    from megamod.data.templates import VICUNA_SYSTEM
    from megamod.data.tokenizer import load_tokenizer
    from megamod.models.language import LanguageModelConfig

    tmp = tmp_path_factory.mktemp("padded-pair")
    rows = _conversations(12)
    with open(tmp / "text.json", "w") as f:
        json.dump(rows, f)
    texts = [t["value"] for r in rows for t in r["conversations"]] * 4
    train_tokenizer(texts + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 8, str(tmp / "tok"), vocab_size=300)
    T = load_tokenizer(str(tmp / "tok")).vocab_size
    widths = {k: LanguageModelConfig(T + pad, 8, 1, 1, 1, 8).padded_vocab_size for k, pad in PAD.items()}
    assert widths["teacher"] != widths["student"], widths  # the shards of the two would not line up unaided
    hf = {"teacher": dict(hidden_size=96, intermediate_size=128),
          "student": dict(hidden_size=64, intermediate_size=96, tie_word_embeddings=True)}  # Qwen2-0.5B ties
    p = {"T": T, "data": str(tmp / "text.json"), "tmp": tmp}
    distributed.initialize(distributed.ParallelConfig())  # conversion runs in the caller's world (TP = PP = 1)
    for seed, (name, overrides) in enumerate(hf.items(), start=1):
        model = tiny_qwen2(tmp / f"hf-{name}", seed=seed, vocab_size=T + PAD[name], num_hidden_layers=2,
                           max_position_embeddings=256, **overrides)
        with torch.no_grad():  # loud padding rows: any that reached a loss would move it far
            model.lm_head.weight[T:] *= 30
        model.save_pretrained(tmp / f"hf-{name}")
        for f in TOKENIZER_FILES:
            if os.path.exists(tmp / "tok" / f):
                shutil.copy(tmp / "tok" / f, tmp / f"hf-{name}")
        hf_to_megamod(str(tmp / f"hf-{name}"), str(tmp / name))
        p[name], p[f"hf-{name}"] = str(tmp / name), str(tmp / f"hf-{name}")
    # The same teacher carrying another tokenizer of the same size.
    shutil.copytree(tmp / "teacher", tmp / "other", ignore=shutil.ignore_patterns("tokenizer"))
    p["other"] = str(tmp / "other")
    p["other_tok"] = swap_token_ids(str(tmp / "tok"), str(tmp / "other" / "tokenizer"))
    return p


def _recipe(p, out, teacher, steps=2, **extra):
    return {"stage": "d2d", "student": p["student"], "teacher": teacher, "out": str(out),
            "data": {"train": [{"path": p["data"]}], "max_length": 256},
            "schedule": {"global_batch_size": 4, "micro_batch_size": 2, "steps": steps},
            "log": {"tensorboard": False, "progress": False}, "optim": {"lr": 1e-3}, **extra}


def _trainer(recipe):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=recipe))


def _transformers_kd(p, mbs, columns: int) -> float:
    """Mean over micro-batches of the masked mean KL(p_T || p_S) over the first `columns` ids, by transformers."""
    from transformers import Qwen2ForCausalLM

    models = {k: Qwen2ForCausalLM.from_pretrained(p[f"hf-{k}"]).eval() for k in ("teacher", "student")}
    kd = []
    with torch.no_grad():
        for mb in mbs:
            logp = {k: m(mb.tokens).logits[..., :columns].log_softmax(-1) for k, m in models.items()}
            kl_BS = (logp["teacher"].exp() * (logp["teacher"] - logp["student"])).sum(-1)
            kd.append(float((kl_BS * mb.loss_mask).sum() / mb.loss_mask.sum()))
    return sum(kd) / len(kd)


def test_pair_distils_at_tp1_and_tp2_with_the_tokenizers_kd(pair, tmp_path):
    p, T = pair, pair["T"]
    trainer = _trainer(_recipe(p, tmp_path / "tp1", p["teacher"]))
    rows = T + PAD["teacher"]
    assert trainer.objective.vocab_size == T
    assert trainer.student.language.padded_vocab_size == trainer.teacher.language.padded_vocab_size >= rows
    state = trainer.loader.state_dict()
    first_step = trainer._micro_batches(iter(trainer.loader))
    trainer.loader.load_state_dict(state)
    tp1 = trainer.train()
    expected = _transformers_kd(p, first_step, T)
    assert tp1[0]["kd"] == pytest.approx(expected, rel=1e-4)
    # the padding columns carry real mass in these checkpoints: a KD over them would be another number
    assert abs(_transformers_kd(p, first_step, T + PAD["student"]) - expected) > 0.5 * expected
    # the trained student, stored at the pair's width, exports at its own rows; its padding rows got no gradient
    from transformers import Qwen2ForCausalLM

    from megamod import distributed
    from megamod.convert.checkpoint import megamod_to_hf

    distributed.initialize(distributed.ParallelConfig())
    megamod_to_hf(str(tmp_path / "tp1" / "model"), str(tmp_path / "hf-out"))
    before, after = (Qwen2ForCausalLM.from_pretrained(d).model.embed_tokens.weight
                     for d in (p["hf-student"], tmp_path / "hf-out"))
    assert after.shape == before.shape == (T + PAD["student"], 64)
    assert torch.equal(after[T:], before[T:]) and not torch.equal(after[:T], before[:T])

    run_jobs(2, [{"kind": "trainer", "recipe": _recipe(p, tmp_path / "tp2", p["teacher"], parallel={"tp": 2}),
                  "out": str(tmp_path / "tp2.json")}], str(tmp_path))
    with open(tmp_path / "tp2.json") as f:
        tp2 = json.load(f)
    assert [h["step"] for h in tp2] == [h["step"] for h in tp1] == [1, 2]
    for a, b in zip(tp2, tp1):
        for key in ("loss", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    print(f"\npadded pair ({T} ids; teacher {T + PAD['teacher']} rows, student {T + PAD['student']}): KD "
          f"{[h['kd'] for h in tp1]} at TP=1, {[h['kd'] for h in tp2]} at TP=2; transformers {expected:.6f}")


def test_a_teacher_with_another_tokenizer_is_refused_by_name(pair, tmp_path):
    from megamod.data.tokenizer import TokenizerError

    p = pair
    with pytest.raises(TokenizerError, match=rf"teacher {p['other']}: tokenizer {p['other_tok']} \({p['T']} ids\) "
                                             rf"and the student's tokenizer {p['student']}/tokenizer .* different "
                                             rf"tokenizers: id 100"):
        _trainer(_recipe(p, tmp_path / "run", p["other"]))
    # data.tokenizer that is not the student's own: refused as well, before any model is built
    with pytest.raises(TokenizerError, match=rf"given tokenizer {p['other_tok']} .* {p['student']}'s tokenizer"):
        _trainer(_recipe(p, tmp_path / "run2", p["teacher"], data={"train": [{"path": p["data"]}],
                                                                   "tokenizer": p["other_tok"]}))


def test_cache_teacher_and_cached_kd_use_the_tokenizers_vocabulary(pair, tmp_path):
    from megamod.cli import main
    from megamod.data.tokenizer import TokenizerError
    from megamod.teacher_cache.format import CacheError
    from megamod.teacher_cache.reader import TeacherCache

    p, T = pair, pair["T"]
    args = ["--data", p["data"], "--topk", str(TOPK), "--max-length", "256", "--no-progress"]
    assert main(["cache-teacher", "--ckpt", p["teacher"], "--out", str(tmp_path / "cache"), *args]) == 0
    cache = TeacherCache(str(tmp_path / "cache"))
    assert cache.vocab_size == T  # not the teacher's T + 128 rows
    assert max(int(cache.rows(sid)[0].max()) for sid in cache.manifest["samples"]) < T
    history = _trainer(_recipe(p, tmp_path / "cached", {"cache": str(tmp_path / "cache")}, steps=1)).train()
    assert history[0]["kd"] > 0
    with pytest.raises(TokenizerError, match=rf"given tokenizer {p['other_tok']} .* {p['teacher']}'s tokenizer"):
        main(["cache-teacher", "--ckpt", p["teacher"], "--out", str(tmp_path / "bad"), "--tokenizer", p["other_tok"],
              *args])
    assert main(["cache-teacher", "--ckpt", p["other"], "--out", str(tmp_path / "other"), *args]) == 0
    with pytest.raises(CacheError, match=rf"written with tokenizer {p['other_tok']} \({T} ids\), the student reads "
                                         rf"tokenizer {p['student']}/tokenizer \({T} ids\): different tokenizers"):
        _trainer(_recipe(p, tmp_path / "run", {"cache": str(tmp_path / "other")}))
