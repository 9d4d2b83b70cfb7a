"""POPE as a LLaVA user runs it: LLaVA's question file + POPE's annotation directory in one `megamod eval`, the answer
file read by LLaVA's own eval_pope.py logic (re-implemented below as LLaVA has it), chunked runs and their merge."""
import json
import math
import os
import shutil

import pytest

from megamod.cli import main
from megamod.eval import answers, formats, pope_llava, tasks

CATEGORIES = ("adversarial", "popular", "random")


# ---- LLaVA's scripts, as written in llava/eval/eval_pope.py and llava/eval/model_vqa_loader.py --------------------
def _eval_pope(answers, label_file):
    label_list = [json.loads(q)['label'] for q in open(label_file, 'r')]
    for answer in answers:
        text = answer['text']
        if text.find('.') != -1:
            text = text.split('.')[0]
        text = text.replace(',', '')
        words = text.split(' ')
        if 'No' in words or 'not' in words or 'no' in words:
            answer['text'] = 'no'
        else:
            answer['text'] = 'yes'
    for i in range(len(label_list)):
        if label_list[i] == 'no':
            label_list[i] = 0
        else:
            label_list[i] = 1
    pred_list = []
    for answer in answers:
        if answer['text'] == 'no':
            pred_list.append(0)
        else:
            pred_list.append(1)
    pos = 1
    neg = 0
    yes_ratio = pred_list.count(1) / len(pred_list)
    TP, TN, FP, FN = 0, 0, 0, 0
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1
        elif pred == pos and label == neg:
            FP += 1
        elif pred == neg and label == neg:
            TN += 1
        elif pred == neg and label == pos:
            FN += 1
    precision = float(TP) / float(TP + FP)
    recall = float(TP) / float(TP + FN)
    f1 = 2 * precision * recall / (precision + recall)
    acc = (TP + TN) / (TP + TN + FP + FN)
    return {"count": len(pred_list), "accuracy": acc, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes_ratio, "tp": TP, "fp": FP, "tn": TN, "fn": FN}


def llava_eval_pope(annotation_dir, question_file, result_file) -> dict:
    """eval_pope.py's __main__: what it prints per category."""
    questions = [json.loads(line) for line in open(question_file)]
    questions = {question['question_id']: question for question in questions}
    answers = [json.loads(q) for q in open(result_file)]
    printed = {}
    for file in os.listdir(annotation_dir):
        assert file.startswith('coco_pope_')
        assert file.endswith('.json')
        category = file[10:-5]
        cur_answers = [x for x in answers if questions[x['question_id']]['category'] == category]
        printed[category] = _eval_pope(cur_answers, os.path.join(annotation_dir, file))
    return printed


def llava_get_chunk(lst, n, k):
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)][k]


# ---- fixtures in LLaVA's layout -----------------------------------------------------------------------------------
def write_llava_pope(data: str, root, per_category: int = 10, suffix: str = "") -> dict:
    """playground/data/eval/pope as LLaVA lays it out, from the synthetic POPE files: val2014/ images, coco/ with one
    POPE label file per category (ids from 1 in each), llava_pope_test.jsonl (ids running across categories, no
    labels; `suffix` appended to each question's text)."""
    def rows(name):
        with open(os.path.join(data, "eval", name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    adversarial, random = rows("pope_adversarial.jsonl"), rows("pope_random.jsonl")
    source = {"adversarial": adversarial[:per_category], "popular": random[:per_category],
              "random": random[per_category:2 * per_category]}
    val, coco = root / "val2014", root / "coco"
    val.mkdir(parents=True)
    coco.mkdir()
    questions = []
    for category in CATEGORIES:
        with open(coco / f"coco_pope_{category}.json", "w") as f:
            for i, row in enumerate(source[category], 1):
                name = "COCO_val2014_" + os.path.basename(row["image"])
                if not (val / name).exists():
                    shutil.copy(os.path.join(data, row["image"]), val / name)
                label = {"question_id": i, "image": name, "text": row["text"], "label": row["label"]}
                f.write(json.dumps(label) + "\n")
                questions.append({"question_id": len(questions) + 1, "image": name, "text": row["text"] + suffix,
                                  "category": category})
    question_file = root / "llava_pope_test.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"questions": str(question_file), "coco": str(coco), "images": str(val)}


@pytest.fixture
def pope_files(engine_setup, tmp_path):
    return write_llava_pope(engine_setup["data"], tmp_path / "pope")


def _pope_args(files, *extra):
    return ["eval", "--task", "pope", "--data", files["questions"], "--annotation-dir", files["coco"],
            "--image-folder", files["images"], *extra]


def _mixed_choices(monkeypatch):
    """Forwards replaced by a fixed answer per question (right on two of three): both answers occur in every
    category, as eval_pope.py's divisions need."""
    from megamod.eval import runner

    def fake_choose(loaded, tokenizer, rows, **kw):
        out = {}
        for (pos, r), _, item, ids in rows:
            yes = item.label if pos % 3 else not item.label
            out[(pos, r)] = [1.0, 0.0] if yes else [0.0, 1.0]
        return out

    monkeypatch.setattr(runner, "choose", fake_choose)


# ---- the one command ----------------------------------------------------------------------------------------------
def test_llava_pope_files_in_one_command_score_as_eval_pope(engine_setup, pope_files, tmp_path, monkeypatch,
                                                            capsys):
    _mixed_choices(monkeypatch)
    out, answer_file = tmp_path / "pope.json", tmp_path / "answers" / "teacher.jsonl"
    assert main(_pope_args(pope_files, "--ckpt", engine_setup["teacher"], "--conv-mode", "vicuna_v1",
                           "--answers-file", str(answer_file), "--out", str(out))) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result["count"] == 30 and set(result["categories"]) == set(CATEGORIES)
    for category in CATEGORIES + ("all",):
        assert category in printed
    theirs = llava_eval_pope(pope_files["coco"], pope_files["questions"], str(answer_file))
    for category in CATEGORIES:
        assert result["categories"][category] == pytest.approx(theirs[category]), category
        assert 0 < theirs[category]["yes_ratio"] < 1
    pooled = {k: sum(theirs[c][k] for c in CATEGORIES) for k in ("tp", "fp", "tn", "fn")}
    assert {k: result[k] for k in pooled} == pooled
    # The records are LLaVA's, one per question, in the question file's order.
    records = [json.loads(line) for line in answer_file.read_text().splitlines()]
    questions = [json.loads(line) for line in open(pope_files["questions"])]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    assert all(list(r) == list(answers.FIELDS) for r in records)
    assert all(r["prompt"] == q["text"] and r["text"] in ("Yes", "No") for r, q in zip(records, questions))
    assert {r["model_id"] for r in records} == {os.path.basename(engine_setup["teacher"])}
    assert all(r["metadata"] == {} for r in records)
    ids = [r["answer_id"] for r in records]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 and i.isalnum() for i in ids)


def test_chunked_runs_merge_to_the_unsplit_score(engine_setup, pope_files, tmp_path):
    """Four chunks as LLaVA splits 30 questions (8, 8, 8, 6), each run on the real tiny teacher; their merge scores
    what the whole run scored."""
    whole = tmp_path / "whole.json"
    assert main(_pope_args(pope_files, "--ckpt", engine_setup["teacher"], "--out", str(whole))) == 0
    questions = [json.loads(line) for line in open(pope_files["questions"])]
    parts = []
    for k in range(4):
        parts.append(str(tmp_path / "chunks" / f"4_{k}.jsonl"))
        assert main(_pope_args(pope_files, "--ckpt", engine_setup["teacher"], "--num-chunks", "4", "--chunk-idx",
                               str(k), "--answers-file", parts[-1])) == 0
        with open(parts[-1]) as f:
            assert [json.loads(line)["question_id"] for line in f] == [
                q["question_id"] for q in llava_get_chunk(questions, 4, k)]
    merged_out, merged_answers = tmp_path / "merged.json", tmp_path / "merged.jsonl"
    assert main(_pope_args(pope_files, "--merge", *parts, "--out", str(merged_out), "--answers-file",
                           str(merged_answers))) == 0
    merged, ref = json.loads(merged_out.read_text()), json.loads(whole.read_text())
    for key in ("count", "accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn"):
        assert merged[key] == ref[key], key
    assert merged["categories"] == ref["categories"]
    assert [p["pred"] for p in merged["predictions"]] == [p["pred"] for p in ref["predictions"]]
    assert merged_answers.read_text() == "".join(open(p).read() for p in parts)


def test_chunks_split_as_llava_does():
    for length in range(1, 23):
        items = list(range(length))
        for n in range(1, 8):
            count = len(range(0, length, math.ceil(length / n)))  # LLaVA's chunks (fewer than n when short)
            for k in range(n):
                if k < count:
                    assert tasks.chunk(items, n, k) == llava_get_chunk(items, n, k)
                else:
                    with pytest.raises(ValueError, match=f"chunk {k} of {n} is empty"):
                        tasks.chunk(items, n, k)
    with pytest.raises(ValueError, match="0 <= chunk_idx < num_chunks"):
        tasks.chunk([1, 2], 2, 2)


# ---- reading LLaVA's files and POPE's labels ---------------------------------------------------------------------
def test_labels_match_by_question_across_numberings_and_instruction_lines(engine_setup, tmp_path):
    """LLaVA numbers questions across the categories, POPE's files from 1 each; question texts may carry the
    short-answer line. Labels still follow the question asked."""
    files = write_llava_pope(engine_setup["data"], tmp_path / "pope", per_category=4,
                             suffix="\nAnswer the question using a single word or phrase.")
    items = pope_llava.read_llava_pope(files["questions"], files["coco"], files["images"])
    labels = {}
    for category in CATEGORIES:
        with open(os.path.join(files["coco"], f"coco_pope_{category}.json")) as f:
            labels[category] = [json.loads(line)["label"] == "yes" for line in f]
    assert [it.id for it in items] == list(range(1, 13))
    assert [it.category for it in items] == [c for c in CATEGORIES for _ in range(4)]
    assert [it.label for it in items] == labels["adversarial"] + labels["popular"] + labels["random"]
    assert items[0].question.endswith("\nAnswer the question using a single word or phrase.")
    assert items[0].image == os.path.join(files["images"], json.loads(open(files["questions"]).readline())["image"])
    assert len(tasks.read_items("pope", files["questions"], files["images"], 5, files["coco"])) == 5


def test_a_question_missing_from_the_labels_names_both_files(pope_files):
    lines = open(pope_files["questions"]).read().splitlines()
    q = json.loads(lines[11])
    q["text"] = "Is there a unicorn in the image?"
    lines[11] = json.dumps(q)
    with open(pope_files["questions"], "w") as f:
        f.write("\n".join(lines) + "\n")
    label_file = os.path.join(pope_files["coco"], "coco_pope_popular.json")
    with pytest.raises(formats.FormatError, match=rf"llava_pope_test.jsonl:12: question_id 12 .*unicorn.* is not "
                                                  rf"in {label_file}"):
        pope_llava.read_llava_pope(pope_files["questions"], pope_files["coco"], pope_files["images"])


@pytest.mark.parametrize("change, error", [
    (lambda q: q.pop("category"), r"llava_pope_test.jsonl:1: field 'category'"),
    (lambda q: q.update(category="lvis"), r"llava_pope_test.jsonl:1: category 'lvis' has no label file in .*coco "
                                          r"\(found \['adversarial', 'popular', 'random'\]\)"),
    (lambda q: q.update(question_id=2), r"llava_pope_test.jsonl:2: question_id 2 repeats .*llava_pope_test.jsonl:1"),
])
def test_bad_question_records_name_file_and_line(pope_files, change, error):
    lines = open(pope_files["questions"]).read().splitlines()
    q = json.loads(lines[0])
    change(q)
    lines[0] = json.dumps(q)
    with open(pope_files["questions"], "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(formats.FormatError, match=error):
        pope_llava.read_llava_pope(pope_files["questions"], pope_files["coco"], pope_files["images"])


def test_bad_label_files_name_file_and_line(pope_files, tmp_path):
    path = os.path.join(pope_files["coco"], "coco_pope_random.json")
    lines = open(path).read().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "label": "maybe"})
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(formats.FormatError, match=r"coco_pope_random.json:3: field 'label'"):
        pope_llava.read_llava_pope(pope_files["questions"], pope_files["coco"], pope_files["images"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(formats.FormatError, match="no POPE label files"):
        pope_llava.annotation_files(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="task pope, not 'mcq'"):
        tasks.read_items("mcq", pope_files["questions"], annotation_dir=pope_files["coco"])


# ---- merging answer files ----------------------------------------------------------------------------------------
def _answer_files(pope_files, tmp_path, edit=None):
    items = pope_llava.read_llava_pope(pope_files["questions"], pope_files["coco"], pope_files["images"])
    rows = [{"question_id": it.id, "prompt": it.question, "text": "Yes" if it.label else "No", "answer_id": "x",
             "model_id": "m", "metadata": {}} for it in items]
    if edit:
        edit(rows)
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    answers.write(str(paths[0]), rows[:20])
    answers.write(str(paths[1]), rows[20:])
    return items, [str(p) for p in paths]


@pytest.mark.parametrize("edit, error", [
    (lambda rows: rows.pop(25), r"1 of the 30 questions of .*llava_pope_test.jsonl have no answer .* question_id "
                                r"\[26\]"),
    (lambda rows: rows.__setitem__(25, {**rows[25], "question_id": 3}), r"b.jsonl:6: question_id 3 .* answered "
                                                                        r"again, first at .*a.jsonl:3"),
    (lambda rows: rows.__setitem__(0, {**rows[0], "question_id": 99}), r"a.jsonl:1: question_id 99 is not a "
                                                                       r"question of"),
    (lambda rows: rows[4].pop("text"), r"a.jsonl:5: an answer record needs 'question_id' and a string 'text'"),
])
def test_merge_errors_name_the_answer_file_and_line(pope_files, tmp_path, edit, error):
    items, paths = _answer_files(pope_files, tmp_path, edit)
    with pytest.raises(formats.FormatError, match=error):
        answers.score("pope", items, answers.read(paths), pope_files["questions"])


def test_answers_are_read_as_eval_pope_reads_them(pope_files, tmp_path):
    assert [answers.llava_yes_no(t) for t in ("Yes", "No", "No.", "Yes, there is.", "There is not a dog.",
                                              "no", "Nope", "Yes. No.", "yes, no")] == [
        True, False, False, True, False, False, True, True, False]
    items, paths = _answer_files(pope_files, tmp_path)
    result = answers.score("pope", items, answers.read(paths), pope_files["questions"])
    assert result["accuracy"] == 1.0 and all(m["accuracy"] == 1.0 for m in result["categories"].values())
