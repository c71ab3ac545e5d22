"""Regenerate the bundled sample data (topics.csv, reviews.jsonl, simplecot.jsonl) exactly."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import polars as pl

HERE = Path(__file__).parent

SUBJECTS = [
    "cats",
    "dogs",
    "penguins",
    "octopuses",
    "giraffes",
    "coffee",
    "tea",
    "pizza",
    "tacos",
    "sushi",
    "libraries",
    "airports",
    "trains",
    "bicycles",
    "submarines",
    "volcanoes",
    "the moon",
    "black holes",
    "dinosaurs",
    "robots",
    "spreadsheets",
    "databases",
    "wifi",
    "passwords",
    "meetings",
    "email",
    "printers",
    "gardening",
    "camping",
    "marathons",
    "chess",
    "jazz",
    "opera",
    "karaoke",
    "dentists",
    "accountants",
    "astronauts",
    "pirates",
    "wizards",
    "vampires",
    "bakers",
    "plumbers",
    "mathematicians",
    "physicists",
    "poets",
    "elevators",
    "umbrellas",
    "socks",
    "Mondays",
    "weather forecasts",
]
ANGLES = ["", "on vacation", "in space", "at work", "on a first date"]

PRODUCTS = [
    "wireless earbuds",
    "coffee grinder",
    "hiking boots",
    "phone case",
    "desk lamp",
    "blender",
    "yoga mat",
    "backpack",
    "electric kettle",
    "mechanical keyboard",
    "air fryer",
    "water bottle",
    "office chair",
    "smart watch",
    "rice cooker",
    "running shoes",
    "paperback novel",
    "board game",
    "bluetooth speaker",
    "umbrella",
]
OPINIONS = [
    ("positive", "Works exactly as described and the quality is great."),
    ("positive", "Arrived early, easy to set up, and I use it every day."),
    ("positive", "Best purchase this year; my partner wants one too."),
    ("positive", 'Sturdy and well made. The "premium" label is earned.'),
    ("negative", "Broke after two weeks and support never answered."),
    ("negative", "Much smaller than the photos suggest. Returning it."),
    ("negative", "Loud, flimsy, and the battery dies in an hour."),
    ("negative", "Smells of plastic {even after washing} and the seams are coming apart."),
    ("neutral", "It does the job. Nothing special, nothing wrong."),
    ("neutral", "Fine for the price, though the instructions were confusing."),
]


def topics() -> pl.DataFrame:
    """250 topics: every subject with every angle."""
    rows = [f"{s} {a}".strip() for a, s in itertools.product(ANGLES, SUBJECTS)]
    return pl.DataFrame({"topic": rows})


def reviews(n: int = 200) -> pl.DataFrame:
    """Short product reviews with an id, a product, and the sentiment they were written with."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        product = rng.choice(PRODUCTS)
        label, text = rng.choice(OPINIONS)
        stars = {"positive": rng.choice([4, 5]), "negative": rng.choice([1, 2]), "neutral": 3}
        rows.append(
            {
                "review_id": f"rev-{i:04d}",
                "product": product,
                "stars": stars[label],
                "input_text": f"The {product}: {text}",
                "expected_sentiment": label,
            }
        )
    return pl.DataFrame(rows)


def simplecot(n: int = 300) -> pl.DataFrame:
    """SimpleCoT-shaped rows: a multiple-choice arithmetic question, its answer and rationale."""
    rng = random.Random(11)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        right = a + b
        options = sorted({right, right + rng.randint(1, 9), right - rng.randint(1, 9), right + 10})
        letters = "ABCD"[: len(options)]
        choices = " ".join(
            f"({letter}) {value}" for letter, value in zip(letters, options, strict=True)
        )
        target = letters[options.index(right)]
        rows.append(
            {
                "source": f"Q{i}: A crate holds {a} apples and another holds {b}. How many "
                f"apples are there in all? Options: {choices}",
                "target": target,
                "rationale": f"{a} + {b} = {right}, which is option ({target}).",
            }
        )
    return pl.DataFrame(rows)


if __name__ == "__main__":
    topics().write_csv(HERE / "topics.csv")
    reviews().write_ndjson(HERE / "reviews.jsonl")
    simplecot().write_ndjson(HERE / "simplecot.jsonl")
