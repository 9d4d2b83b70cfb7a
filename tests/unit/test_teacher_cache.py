"""The offline teacher: cache-teacher's files, the reader's checks, and training from a cache against the online
teacher (one process; the DP=2 read is in tests/distributed/test_teacher_cache_dp.py)."""
import json
import os
import shutil

import pytest
import torch

from tests.training_setup import base_recipe

MAX_LENGTH = 256  # base_recipe's data.max_length: the cache must be written with the training data settings


def write(p, out, kind="conversations", topk=64, dtype="float32", shard_size=10, batch_size=3, **extra):
    from megamod import distributed
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource

    name = "pairs.jsonl" if kind == "pairs" else "conversations.json"
    job = CacheJob(ckpt=p["teacher"], data=[DataSource(os.path.join(p["data"], name))], out=out, kind=kind,
                   topk=topk, dtype=dtype, shard_size=shard_size, batch_size=batch_size, max_length=MAX_LENGTH,
                   progress=False, **extra)
    distributed.initialize(distributed.ParallelConfig(tp=job.tp, pp=job.pp))
    return write_cache(job)


def _vocab(p) -> int:
    from megamod import checkpoint

    return checkpoint.read_metadata(p["teacher"])["model"]["language"]["vocab_size"]


@pytest.fixture(scope="module")
def caches(engine_setup, tmp_path_factory):
    p, root = engine_setup, tmp_path_factory.mktemp("caches")
    out = {k: str(root / k) for k in ("full", "top64", "pairs")}
    write(p, out["full"], topk=_vocab(p), dtype="float32")
    write(p, out["top64"], topk=64, dtype="bfloat16")
    write(p, out["pairs"], kind="pairs")
    return out


def _run(recipe):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    trainer = Trainer(load_config(base=recipe))
    return trainer, trainer.train()


def test_manifest_describes_every_sample(engine_setup, caches):
    manifest = json.load(open(os.path.join(caches["top64"], "manifest.json")))
    assert manifest["kind"] == "conversations" and manifest["topk"] == 64 and manifest["dtype"] == "bfloat16"
    records = json.load(open(os.path.join(engine_setup["data"], "conversations.json")))
    assert manifest["num_samples"] == len(records) == len(manifest["samples"]) > 20
    assert set(manifest["samples"]) == {str(r["id"]) for r in records}
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, len(records) - 20]
    from megamod.teacher_cache.format import sha256_file

    for shard in manifest["shards"]:
        assert sha256_file(os.path.join(caches["top64"], shard["file"])) == shard["sha256"]
    from megamod.teacher_cache.reader import TeacherCache

    cache = TeacherCache(caches["top64"])
    ids_NK, logprobs_NK, log_tail_N, labels_N = cache.rows(next(iter(manifest["samples"])))
    assert ids_NK.shape == logprobs_NK.shape and ids_NK.shape[1] == 64 and logprobs_NK.dtype == torch.bfloat16
    assert log_tail_N.dtype == torch.float32 and labels_N.shape == log_tail_N.shape
    # the buckets are a distribution: top-64 mass + tail mass = 1 (to bf16 rounding)
    total_N = logprobs_NK.float().exp().sum(-1) + log_tail_N.exp()
    assert (total_N - 1).abs().max().item() <= 1e-2


def test_whole_vocabulary_cache_trains_as_the_online_teacher(engine_setup, caches, tmp_path):
    """K = V, fp32: d2d from the cache gives the online run's KD loss and gradient norm at every step."""
    p = engine_setup
    online = base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "online"), teacher=p["teacher"],
                         schedule={"steps": 2})
    cached = base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "cached"), teacher={"cache": caches["full"]},
                         schedule={"steps": 2})
    _, ref = _run(online)
    trainer, got = _run(cached)
    assert trainer.teacher is None  # no teacher weights in memory
    for g, r in zip(got, ref):
        assert abs(g["kd"] - r["kd"]) <= 1e-6 * max(1.0, abs(r["kd"])), (g["step"], g["kd"], r["kd"])
        assert abs(g["grad_norm"] - r["grad_norm"]) <= 1e-6 * max(1.0, r["grad_norm"])


def test_top64_bf16_cache_gap_is_bounded_by_the_tail(engine_setup, caches, tmp_path):
    """K = 64, bf16, on the first step's micro-batches of a d2d run: per answer position the bucketed KL is short of
    the online KL by q_R KL(q(.|R) || p(.|R)), between 0 and q_R log max_j(q(j|R) / p(j|R)) (q_R: the teacher's
    mass outside its top 64), up to bf16 rounding. The measured gap is printed."""
    from megamod.losses.kd import kd_loss_BS
    from megamod.losses.topk_kd import topk_kd_loss_BS
    from megamod.training.config import load_config
    from megamod.loading.models import load_teacher
    from megamod.families.llava import LLAVA
    from megamod.loading.microbatch import run_model
    from megamod.training.trainer import Trainer

    p = engine_setup
    V = _vocab(p)
    trainer = Trainer(load_config(base=base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "cached"),
                                                   teacher={"cache": caches["top64"]})))
    teacher = load_teacher(p["teacher"], trainer.student, torch.float32, False)
    gaps, tails, online, bounds = [], [], [], []
    for mb in trainer._micro_batches(iter(trainer.loader)):
        with torch.no_grad():
            s_BSv, t_BSv = run_model(trainer.ddp, mb, LLAVA), run_model(teacher.model, mb, LLAVA)
            c = mb.cached
            m = mb.loss_mask.bool()
            full_N = kd_loss_BS(s_BSv, t_BSv, V)[m].double()
            cached_N = topk_kd_loss_BS(s_BSv, c.ids_BSK, c.logprobs_BSK, c.log_tail_BS, V)[m].double()
            q_NV = torch.softmax(t_BSv[..., :V].double(), -1)[m]
            p_NV = torch.softmax(s_BSv[..., :V].double(), -1)[m]
        tail_NV = torch.ones_like(q_NV, dtype=torch.bool).scatter(-1, c.ids_BSK[m], False)
        q_tail_N = (q_NV * tail_NV).sum(-1)
        ratio_NV = (q_NV / q_tail_N.unsqueeze(-1)) / (p_NV / (p_NV * tail_NV).sum(-1, keepdim=True))
        bound_N = q_tail_N * torch.where(tail_NV, ratio_NV.log(), torch.full_like(ratio_NV, -1e30)).amax(-1)
        gaps.append(full_N - cached_N), tails.append(q_tail_N), online.append(full_N), bounds.append(bound_N)
    gap_N, tail_N, full_N, bound_N = (torch.cat(x) for x in (gaps, tails, online, bounds))
    print(f"\nK=64 of V={V}, bf16, {len(gap_N)} answer positions: teacher tail mass mean {tail_N.mean():.3g}; KL gap "
          f"mean {gap_N.mean():.3g} (max {gap_N.max():.3g}) of online KL mean {full_N.mean():.3g}; bound mean "
          f"{bound_N.mean():.3g}")
    tol = 1e-2 * tail_N + 1e-3  # bf16 storage of the top-k log-probs (3 significant digits)
    assert torch.all(gap_N >= -tol)
    assert torch.all(gap_N <= bound_N + tol)


def test_cached_dpo_equals_online_dpo(engine_setup, caches, tmp_path):
    """The cached reference log-probs are the online teacher's fp32 values: the DPO loss and its gradient agree;
    with the same micro-batch the cached and online Objective give bitwise the same loss."""
    p = engine_setup
    online = base_recipe(p["root"], "preference", p["sparse"], str(tmp_path / "online"), teacher=p["teacher"],
                         schedule={"steps": 2})
    cached = base_recipe(p["root"], "preference", p["sparse"], str(tmp_path / "cached"),
                         teacher={"cache": caches["pairs"]}, schedule={"steps": 2})
    (_, ref), (trainer, got) = _run(online), _run(cached)
    for g, r in zip(got, ref):
        for k in ("preference", "reward_margin", "grad_norm"):
            assert abs(g[k] - r[k]) <= 1e-6 * max(1.0, abs(r[k])), (g["step"], k, g[k], r[k])

    # Bitwise: one micro-batch, the online reference from the teacher vs the cache's row for the same samples.
    from megamod.loading.models import load_teacher
    from megamod.families.llava import LLAVA
    from megamod.loading.microbatch import run_model

    teacher = load_teacher(p["teacher"], trainer.student, torch.float32, False)
    mb = trainer._micro_batches(iter(trainer.loader))[0]
    with torch.no_grad():
        student_BSv = run_model(trainer.ddp, mb, LLAVA)
        teacher_BSv = run_model(teacher.model, mb, LLAVA)
    loss_online, _ = trainer.objective.loss(student_BSv, teacher_BSv, mb.__class__(**{**mb.__dict__, "cached": None}))
    loss_cached, _ = trainer.objective.loss(student_BSv, None, mb)
    print(f"\nDPO one micro-batch: online {loss_online.item():.9f} cached {loss_cached.item():.9f}")
    assert loss_online.item() == loss_cached.item()


def test_damaged_or_incomplete_cache_is_an_error(engine_setup, caches, tmp_path):
    from megamod.teacher_cache.format import CacheError
    from megamod.teacher_cache.reader import TeacherCache

    broken = str(tmp_path / "broken")
    shutil.copytree(caches["top64"], broken)
    manifest = json.load(open(os.path.join(broken, "manifest.json")))
    shard = manifest["shards"][1]["file"]
    sid = next(s for s, (index, _, _) in manifest["samples"].items() if index == 1)
    with open(os.path.join(broken, shard), "r+b") as f:  # one flipped byte in the data
        f.seek(-7, 2)
        byte = f.read(1)
        f.seek(-7, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    cache = TeacherCache(broken)
    cache.rows(next(s for s, (index, _, _) in manifest["samples"].items() if index == 0))  # shard 0 is intact
    with pytest.raises(CacheError, match=f"{shard}.*fails its checksum"):
        cache.rows(sid)
    with open(os.path.join(broken, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match=f"{shard} is missing or not .* bytes long"):
        TeacherCache(broken)
    os.remove(os.path.join(broken, "manifest.json"))
    with pytest.raises(CacheError, match="manifest.json not found.*incomplete"):
        TeacherCache(broken)
    with pytest.raises(CacheError, match="sample id 'nope' is not in teacher cache"):
        TeacherCache(caches["top64"]).rows("nope")
    p = engine_setup
    with pytest.raises(CacheError, match="holds pairs; this stage trains on conversations"):
        _run(base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "x"), teacher={"cache": caches["pairs"]}))


def test_cache_of_other_answers_names_the_sample(engine_setup, tmp_path):
    """A cache written from data whose answer differs for one sample (another version of the file, another
    tokenizer or template): training stops at that sample, naming it, instead of misaligning rows."""
    from megamod import distributed
    from megamod.teacher_cache.format import CacheError
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource

    p = engine_setup
    records = json.load(open(os.path.join(p["data"], "conversations.json")))
    records[3]["conversations"][-1]["value"] += " and more"
    edited = str(tmp_path / "conversations.json")
    json.dump(records, open(edited, "w"))
    out = str(tmp_path / "other")
    distributed.initialize(distributed.ParallelConfig())
    write_cache(CacheJob(ckpt=p["teacher"], data=[DataSource(edited, image_folder=p["data"])], out=out, topk=8,
                         max_length=MAX_LENGTH, progress=False))
    cfg = base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "x"), teacher={"cache": out},
                      schedule={"steps": -(-len(records) // 4)})  # one epoch: every sample comes
    with pytest.raises(CacheError, match=rf"conversations.json:\d+ \(id '{records[3]['id']}'\).*answer tokens"):
        _run(cfg)


def test_writer_resumes_shard_by_shard_and_refuses_other_settings(engine_setup, caches, tmp_path):
    from megamod.teacher_cache.format import CacheError

    p = engine_setup
    out = str(tmp_path / "resumed")
    shutil.copytree(caches["top64"], out)
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "shards", "shard-00001.json"))  # shard 1 was cut off before its index
    kept = os.stat(os.path.join(out, "shards", "shard-00000.safetensors")).st_mtime_ns
    manifest = write(p, out, topk=64, dtype="bfloat16")
    assert os.stat(os.path.join(out, "shards", "shard-00000.safetensors")).st_mtime_ns == kept  # not rewritten
    assert manifest == json.load(open(os.path.join(caches["top64"], "manifest.json")))
    with pytest.raises(CacheError, match="other settings.*topk"):
        write(p, out, topk=32, dtype="bfloat16")


def test_recipe_checks_for_a_cached_teacher():
    from megamod.training.config import ConfigError, TeacherCacheConfig, load_config

    good = {"stage": "d2d", "student": "s", "out": "o", "data": {"train": [{"path": "x.json"}]},
            "teacher": {"cache": "c"}}
    assert load_config(base=good).teacher == TeacherCacheConfig(cache="c")
    assert load_config(base={**good, "teacher": "t"}).teacher == "t"
    with pytest.raises(ConfigError, match="temperature=1 only"):
        load_config(base={**good, "loss": {"temperature": 2.0}})
    with pytest.raises(ConfigError, match=r"teacher: keys \['dir'\] fit none of its forms: \{cache\} or \{ckpt, "):
        load_config(base={**good, "teacher": {"dir": "c"}})
