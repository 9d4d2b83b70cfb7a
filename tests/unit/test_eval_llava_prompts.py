"""LLaVA's conversation modes, instructions and answer files for every task; the eval package's structure (no import
cycles, its own MMBench suffix) and its use of the caller's parallel state."""
import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from megamod.data.templates import Turn, conv_mode_template
from megamod.eval import answers, formats, prompts, scoring

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")
QUESTION = "<image>\nIs there a red circle in the image?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    """A byte-level BPE tokenizer with Qwen's special tokens (<|endoftext|> ends a turn, ChatML's markers)."""
    from megamod.data.tokenizer import load_tokenizer
    from tests.data_fixtures.builders import build_hf

    return load_tokenizer(build_hf(str(tmp_path_factory.mktemp("tok"))))


def _fake_model(tok):
    return SimpleNamespace(kind="llava", family=SimpleNamespace(takes_images=True), image_token_id=tok.image_id,
                           language=SimpleNamespace(vocab_size=tok.vocab_size))


# ---- LLaVA's Conversation.get_prompt (llava/conversation.py; LLaVA-NeXT's for CHATML), the two styles aliased -----
def llava_prompt(style: str, system: str, roles, sep: str, sep2: str | None, messages) -> str:
    if style == "TWO":
        seps = [sep, sep2]
        ret = system + seps[0]
        for i, (role, message) in enumerate(messages):
            if message:
                ret += role + ": " + message + seps[i % 2]
            else:
                ret += role + ":"
        return ret
    ret = "" if system == "" else system + sep + "\n"  # CHATML
    for role, message in messages:
        if message:
            ret += role + "\n" + message + sep + "\n"
        else:
            ret += role + "\n"
    return ret


def _prompt(template, tok, turns):
    rendered = template.render(turns, tok)
    return rendered.text[:rendered.answer_spans[-1][0]]


def test_vicuna_v1_renders_llavas_literal_prompt(qwen_tok):
    """The string model_vqa_loader.py builds with --conv-mode vicuna_v1, written out."""
    literal = (VICUNA + " USER: <image>\nIs there a red circle in the image?\nAnswer the question using a single "
               "word or phrase. ASSISTANT:")
    template = conv_mode_template("vicuna_v1")
    assert _prompt(template, qwen_tok, [Turn(QUESTION, "-")]) == literal
    assert literal == llava_prompt("TWO", VICUNA, ("USER", "ASSISTANT"), " ", "</s>",
                                   [("USER", QUESTION), ("ASSISTANT", None)])
    from megamod.data.templates import encode_prompt

    assert encode_prompt(template, qwen_tok, [], QUESTION).tolist() == qwen_tok.encode(literal)


@pytest.mark.parametrize("mode, style, system, roles, sep, sep2", [
    ("llava_v1", "TWO", LLAVA_V1, ("USER", "ASSISTANT"), " ", "</s>"),
    ("qwen", "TWO", VICUNA, ("USER", "ASSISTANT"), " ", "<|endoftext|>"),  # LLaVA-MoD's conv_phi
    ("qwen_2", "CHATML", "<|im_start|>system\nYou are a helpful assistant.", ("<|im_start|>user",
                                                                             "<|im_start|>assistant"),
     "<|im_end|>", None),
    ("qwen_2_5", "CHATML", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
     ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>", None),
])
def test_conv_modes_render_llavas_conversations(qwen_tok, mode, style, system, roles, sep, sep2):
    """Two turns and the prompt for a third; for llava_v1 (answers closed by "</s>", not this tokenizer's
    end-of-text) only the prompt of one question."""
    template = conv_mode_template(mode)
    turns = [Turn(QUESTION, "Yes"), Turn("How many squares?", "Two."), Turn("And circles?", "-")]
    if mode == "llava_v1":
        turns = turns[:1]
    messages = [m for t in turns for m in ((roles[0], t.question), (roles[1], t.answer))][:-1] + [(roles[1], None)]
    assert _prompt(template, qwen_tok, turns) == llava_prompt(style, system, roles, sep, sep2, messages)
    with pytest.raises(ValueError, match="unknown LLaVA conversation mode 'mistral_instruct'"):
        conv_mode_template("mistral_instruct")


# ---- instructions and answer files --------------------------------------------------------------------------------
def test_caption_instruction_goes_on_its_own_line_and_into_the_answer_file(engine_setup, qwen_tok, monkeypatch):
    from megamod.data.tokenizer import load_tokenizer
    from megamod.eval import generate

    tok = load_tokenizer(os.path.join(engine_setup["teacher"], "tokenizer"))
    items = formats.read_open(os.path.join(engine_setup["data"], "eval", "captions.jsonl"), limit=3)
    seen = {}

    def fake_generate(loaded, rows, **kw):
        seen["prompts"] = [tok.decode(ids) for _, ids, _ in rows]
        return {key: tok.encode(" A red circle") for key, _, _ in rows}

    monkeypatch.setattr(generate, "greedy_generate", fake_generate)
    result = scoring.evaluate_model(_fake_model(tok), tok, "caption", items, template="vicuna_v1",
                                    instruction=prompts.SHORT_ANSWER)
    for item, prompt in zip(items, seen["prompts"]):
        assert prompt.endswith(f"USER: <image>\n{item.question}\n{prompts.SHORT_ANSWER} ASSISTANT:")
    records = answers.records("caption", items, result, "tiny", prompts.SHORT_ANSWER)
    assert [(r["question_id"], r["prompt"], r["text"]) for r in records] == [
        (it.id, f"{it.question}\n{prompts.SHORT_ANSWER}", "A red circle") for it in items]
    assert all(list(r) == list(answers.FIELDS) for r in records)
    merged = answers.score("caption", items, [(f"a:{i}", r) for i, r in enumerate(records)], "captions.jsonl")
    assert merged["token_f1"] == pytest.approx(result["token_f1"])
    with pytest.raises(ValueError, match="mcq asks with MMBench's letter instruction"):
        scoring.build_rows(tok, "mcq", [], instruction=prompts.SHORT_ANSWER)


def test_mcq_answer_file_is_llavas_mmbench_one_and_merges_to_the_same_score(engine_setup, monkeypatch):
    """model_vqa_mmbench.py --all-rounds records (round_id, rotated options and letters), question ids as pandas
    reads the TSV's index; scoring the records gives the run's accuracy and circular accuracy."""
    from megamod.data.tokenizer import load_tokenizer
    from megamod.eval import runner

    tok = load_tokenizer(os.path.join(engine_setup["teacher"], "tokenizer"))
    items = formats.read_mcq(os.path.join(engine_setup["data"], "eval", "mmbench.jsonl"), limit=6)

    def fake_choose(loaded, tokenizer, rows, **kw):  # option A, except the right one in the first two rounds
        out = {}
        for (pos, r), _, item, _ in rows:
            pick = item.answer if r < 2 else 0
            out[(pos, r)] = [float(k == pick) for k in range(len(item.options))]
        return out

    monkeypatch.setattr(runner, "choose", fake_choose)
    result = scoring.evaluate_model(_fake_model(tok), tok, "mcq", items, circular=True)
    records = answers.records("mcq", items, result, "tiny")
    assert len(records) == 4 * len(items)
    first = records[:4]
    assert [r["round_id"] for r in first] == [0, 1, 2, 3]
    assert [r["option_char"] for r in first] == [list("ABCD"), list("BCDA"), list("CDAB"), list("DABC")]
    assert first[1]["options"] == items[0].options[1:] + items[0].options[:1]
    assert first[1]["prompt"] == prompts.choice_text(formats.rotate(items[0], 1))
    assert first[1]["prompt"].endswith(f"D. {items[0].options[0]}") and "<image>" not in first[1]["prompt"]
    assert all(isinstance(r["question_id"], int) for r in records)
    merged = answers.score("mcq", items, [(f"a:{i}", r) for i, r in enumerate(records)], "mmbench.jsonl")
    for key in ("count", "accuracy", "circular_accuracy", "categories"):
        assert merged[key] == result[key], key
    assert 0 < result["accuracy"] and result["circular_accuracy"] < result["accuracy"]


def test_mmbench_tsv_ids_are_the_index_as_pandas_reads_it(tmp_path):
    import base64
    import csv
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    path = tmp_path / "mmbench_dev.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "answer", "image"])
        writer.writerow([1043, "Q?", "x", "y", "B", base64.b64encode(buf.getvalue()).decode()])
    item = formats.read_mcq(str(path))[0]
    record = answers.records("mcq", [item], {"predictions": [{"pred": "B"}]}, "m")[0]
    assert json.loads(json.dumps(record))["question_id"] == 1043  # convert_mmbench_for_submission: df['index'] ==


def test_answer_ids_are_unique_shortuuid_like_strings():
    ids = [answers.answer_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(len(i) == 22 and i.isalnum() for i in ids)


# ---- structure ----------------------------------------------------------------------------------------------------
def _eval_imports() -> dict[str, set[str]]:
    """megamod.eval module -> the megamod.eval modules it imports anywhere (function-level imports included)."""
    root = Path(__file__).resolve().parents[2] / "megamod" / "eval"
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        targets = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "megamod.eval":
                    targets |= {a.name for a in node.names}
                elif node.module.startswith("megamod.eval."):
                    targets.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[2] for a in node.names if a.name.startswith("megamod.eval.")}
        graph[name] = (targets & modules) - {name}
    return graph


def test_the_eval_package_has_no_import_cycles():
    graph, done, path = _eval_imports(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_mmbench_suffix_is_evals_own_and_the_synthetic_data_trains_on_it():
    from megamod.data import synthetic

    assert prompts.MCQ_SUFFIX == synthetic.MCQ_SUFFIX
    root = Path(__file__).resolve().parents[2] / "megamod" / "eval"
    assert not [p.name for p in root.glob("*.py") if "megamod.data.synthetic" in p.read_text()]


def test_evaluate_uses_the_callers_parallel_state(engine_setup):
    from megamod import distributed

    distributed.shutdown()  # whatever an earlier test left
    with pytest.raises(RuntimeError, match=r"none is initialised: call megamod.distributed.initialize"):
        scoring.evaluate(engine_setup["teacher"], "pope", os.path.join(engine_setup["data"], "eval",
                                                                       "pope_random.jsonl"), limit=2)
