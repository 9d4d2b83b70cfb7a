"""The embedded synthetic multimodal data set: scenes of coloured shapes, their images, and text about them.

A scene is 1-4 shapes (circle, square, triangle, diamond, cross) in 6 colours on a white 64 x 64 canvas, each in its
own cell of a 3 x 3 grid (so "top left", "center", ... name one object), no colour+shape twice. Shapes are drawn
without anti-aliasing: the pixel at an object's `center` has exactly its colour. Everything is derived from a
per-image `random.Random(f"{seed}-{split}-{index}")`, so a seed gives the same bytes on every machine.

The text generators here return answers that are true of the scene (and, for preference pairs, a rejected answer
that is not: it mentions a colour, count, position or object the image does not have). synthetic_writer.py turns
them into the data files.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (245, 130, 30)}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("no", "one", "two", "three", "four")
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"


def position_name(row: int, col: int) -> str:
    """"top left", "top", ..., "center", ..., "bottom right"."""
    if (row, col) == (1, 1):
        return "center"
    return " ".join(w for w in (ROWS[row] if row != 1 else "", COLS[col] if col != 1 else "") if w)


POSITIONS = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def exist_question(color: str, shape: str) -> str:
    return f"Is there {article(color)} {color} {shape} in the image?"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int
    center: tuple[int, int]  # (x, y) pixel
    size: int                # bounding-box side in pixels

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    image: str  # path relative to the data set directory
    objects: list[Obj]

    def to_json(self) -> dict:
        return {"image": self.image, "objects": [asdict(o) | {"position": o.position} for o in self.objects]}

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def has(self, color: str, shape: str) -> bool:
        return any(o.color == color and o.shape == shape for o in self.objects)

    def absent(self) -> list[tuple[str, str]]:
        return [(c, s) for c in COLORS for s in SHAPES if not self.has(c, s)]

    def confusable(self) -> list[tuple[str, str]]:
        """Absent objects that share a colour or a shape with one in the scene (POPE's adversarial negatives)."""
        return [(c, s) for c, s in self.absent() if any(c == o.color or s == o.shape for o in self.objects)]


def make_scene(rng: random.Random, image: str) -> Scene:
    cell = IMAGE_SIZE // GRID
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(1, 4))
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], len(cells))
    objects = []
    for (row, col), (color, shape) in sorted(zip(cells, kinds)):
        size = rng.randint(12, 17)
        slack = cell - size  # keep the whole shape inside its cell
        x0, y0 = col * cell + rng.randint(0, slack), row * cell + rng.randint(0, slack)
        objects.append(Obj(shape, color, row, col, (x0 + size // 2, y0 + size // 2), size))
    return Scene(image, objects)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill, half = COLORS[o.color], o.size // 2
        cx, cy = o.center
        x0, y0, x1, y1 = cx - half, cy - half, cx - half + o.size - 1, cy - half + o.size - 1
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # cross: two bars a third of the size wide
            bar = max(o.size // 3, 3) // 2
            draw.rectangle((x0, cy - bar, x1, cy + bar), fill=fill)
            draw.rectangle((cx - bar, y0, cx + bar, y1), fill=fill)
    return img


def describe(objects: list[Obj]) -> str:
    parts = [f"{article(o.color)} {o.name} at the {o.position}" for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def count_answer(shape: str, n: int) -> str:
    if n == 1:
        return f"There is one {shape}."
    return f"There are {NUMBERS[n]} {plural(shape)}."


def exist_answer(color: str, shape: str, present: bool) -> str:
    return f"Yes, there is {article(color)} {color} {shape}." if present else f"No, there is no {color} {shape}."


# Each question kind: (scene, rng) -> (question, answer), true of the scene.
def q_color(scene, rng):
    unique = [o for o in scene.objects if scene.count(o.shape) == 1]
    if not unique:  # "the circle" must name one object
        return q_position(scene, rng)
    o = rng.choice(unique)
    return f"What color is the {o.shape}?", f"The {o.shape} is {o.color}."


def q_count(scene, rng):
    shape = rng.choice(SHAPES)
    return f"How many {plural(shape)} are there?", count_answer(shape, scene.count(shape))


def q_position(scene, rng):
    o = rng.choice(scene.objects)
    return f"Where is the {o.name}?", f"The {o.name} is at the {o.position}."


def q_exist(scene, rng):
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        color, shape, present = o.color, o.shape, True
    else:
        (color, shape), present = rng.choice(scene.absent()), False
    return exist_question(color, shape), exist_answer(color, shape, present)


def q_describe(scene, rng):
    question = rng.choice(("Describe the image.", "What is in the image?", "Describe the shapes in the image."))
    return question, describe(scene.objects)


def mcq(scene: Scene, rng: random.Random) -> dict:
    """A four-option question about the scene: {"question", "options": [4], "answer": letter, "category"}."""
    kind = rng.choice(("color", "count", "position", "shape"))
    o = rng.choice(scene.objects)
    if kind == "color" and scene.count(o.shape) == 1:
        question, correct, pool = f"What color is the {o.shape}?", o.color, list(COLORS)
    elif kind == "count":
        shape = rng.choice(SHAPES)
        question, correct, pool = f"How many {plural(shape)} are there?", str(scene.count(shape)), list("01234")
    elif kind == "shape" and sum(p.color == o.color for p in scene.objects) == 1:
        question, correct, pool = f"Which shape is {o.color}?", o.shape, list(SHAPES)
    else:  # also when "the <shape>" or "<colour>" would not name one object
        kind, question, correct, pool = "position", f"Where is the {o.name}?", o.position, list(POSITIONS)
    wrong = rng.sample([p for p in pool if p != correct], 3)
    slot = rng.randrange(4)
    options = wrong[:slot] + [correct] + wrong[slot:]
    return {"question": question, "options": options, "answer": LETTERS[slot], "category": kind}


def mcq_prompt(item: dict) -> str:
    lines = [item["question"]] + [f"{letter}. {option}" for letter, option in zip(LETTERS, item["options"])]
    return "\n".join(lines + [MCQ_SUFFIX])


QUESTIONS = (q_color, q_count, q_position, q_exist, q_describe)


def preference(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, chosen, rejected): chosen is true, rejected is not. Half are existence questions, the
    hallucination POPE measures: 60 % about an absent object that shares a colour or a shape with one the image has
    (the objects a model confuses; rejected claims it), 40 % about an object it has (rejected denies it, so that
    preferring the pairs is not a lesson in answering "no"). The rest: a wrong colour, count, position, or an
    invented object in a description."""
    kind = "exist" if rng.random() < 0.5 else rng.choice(("color", "position", "count", "describe"))
    o = rng.choice(scene.objects)
    if kind == "color" and scene.count(o.shape) == 1:
        wrong = rng.choice([c for c in COLORS if c != o.color])
        return f"What color is the {o.shape}?", f"The {o.shape} is {o.color}.", f"The {o.shape} is {wrong}."
    if kind == "exist":
        if rng.random() < 0.4:
            return exist_question(o.color, o.shape), exist_answer(o.color, o.shape, True), \
                exist_answer(o.color, o.shape, False)
        color, shape = rng.choice(scene.confusable())
        return exist_question(color, shape), exist_answer(color, shape, False), exist_answer(color, shape, True)
    if kind == "count" and scene.count(o.shape) < 4:
        n = scene.count(o.shape)
        return f"How many {plural(o.shape)} are there?", count_answer(o.shape, n), count_answer(o.shape, n + 1)
    if kind == "describe":
        taken = {(p.row, p.col) for p in scene.objects}
        row, col = rng.choice([(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken])
        color, shape = rng.choice(scene.absent())
        ghost = Obj(shape, color, row, col, (0, 0), 0)
        fake = sorted(scene.objects + [ghost], key=lambda p: (p.row, p.col))
        return "Describe the image.", describe(scene.objects), describe(fake)
    wrong = rng.choice([p for p in POSITIONS if p != o.position])
    return f"Where is the {o.name}?", f"The {o.name} is at the {o.position}.", f"The {o.name} is at the {wrong}."


# Text-only instruction samples (LLaVA mixes text-only conversations in): facts that need no image.
SIDES = {"triangle": "three", "square": "four", "diamond": "four"}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}


def text_only(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = rng.choice(sorted(SIDES) + ["circle"])
        if shape == "circle":
            return "How many sides does a circle have?", "A circle has no sides."
        return f"How many sides does a {shape} have?", f"A {shape} has {SIDES[shape]} sides."
    (a, b), mixed = rng.choice(sorted(MIXES.items()))
    return f"What color do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {mixed}."
