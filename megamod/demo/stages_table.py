"""What the demo runs and scores: its stages, the checkpoint each training stage starts from, the held-out splits and
their chance levels, the models evaluated, and the export tolerance. pipeline.py runs these and report.py reads them:
a leaf module, so that neither of the two imports the other."""
from __future__ import annotations

TRAINING = {  # demo stage -> (megamod stage, checkpoint it starts from, data)
    "teacher_align": ("align", "init/teacher", "captions"),
    "teacher_single": ("sft", "teacher_align/model", "single"),
    "teacher_sft": ("sft", "teacher_single/model", "conversations"),
    "student_align": ("align", "prune/model", "captions"),
    "d2d": ("d2d", "student_align/model", "conversations"),
    "d2s": ("d2s", "upcycle/model", "conversations"),
    "preference": ("preference", "d2s/model", "pairs"),
}
TEACHER = "teacher_sft/model"  # the distillation stages' teacher
ORDER = ("data", "vision", "init", "teacher_align", "teacher_single", "teacher_sft", "prune", "student_align", "d2d",
         "upcycle", "d2s", "preference", "eval", "export", "report")
EVAL_FILES = {"pope_random": ("pope", "eval/pope_random.jsonl"),
              "pope_adversarial": ("pope", "eval/pope_adversarial.jsonl"),
              "mcq": ("mcq", "eval/mmbench.jsonl")}
CHANCE = {"pope_random": 0.5, "pope_adversarial": 0.5, "mcq": 0.25}  # accuracy of a coin (yes/no), of a die (A-D)
# Models scored, in the report's order: name -> checkpoint under the run directory.
MODELS = {"teacher": TEACHER, "student (aligned)": "student_align/model", "dense student (d2d)": "d2d/model",
          "sparse student (d2s)": "d2s/model", "sparse student (preference)": "preference/model"}
FINAL = "sparse student (preference)"  # the model exported to HF
EXPORT_TOL = 1e-3  # largest |score difference| per item between megamod and transformers on the exported student
