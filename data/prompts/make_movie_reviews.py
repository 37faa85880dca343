"""Regenerates movie_reviews.jsonl: review instructions for invented films (varied titles, genres, lengths).

The titles are invented so no prompt leans on what the model remembers of a real film; the instructions are
neutral about sentiment, so the base model writes a mix of positive, mixed and negative reviews and the
sentiment reward has something to separate. Run: python data/prompts/make_movie_reviews.py
"""

import json
import random
from pathlib import Path

ADJECTIVES = ["Silent", "Broken", "Golden", "Last", "Hidden", "Crimson", "Endless", "Forgotten", "Wild", "Distant",
              "Hollow", "Burning", "Quiet", "Midnight", "Paper", "Iron", "Glass", "Electric", "Lonely", "Northern"]
NOUNS = ["Harbor", "Orchard", "Signal", "Summer", "Kingdom", "River", "Engine", "Lantern", "Frontier", "Garden",
         "Voyage", "Mirror", "Station", "Winter", "Crown", "Echo", "Letter", "Circus", "Island", "Machine"]
GENRES = ["science-fiction", "romantic comedy", "horror", "documentary", "animated family", "crime thriller",
          "historical drama", "western", "musical", "war", "fantasy adventure", "sports drama", "mystery",
          "superhero", "coming-of-age"]
LENGTHS = ["in two sentences", "in about forty words", "in one short paragraph", "in three sentences",
           "briefly", "in under fifty words"]
TEMPLATES = [
    'Write a movie review of "{title}", a {genre} film, {length}.',
    'You just watched the {genre} movie "{title}". Review it {length}.',
    'Give your honest opinion of the {genre} film "{title}" {length}.',
    'Write a review of "{title}" ({year}), a {genre}, {length}.',
    'Describe what you thought of the new {genre} movie "{title}", {length}.',
]


def main() -> None:
    rng = random.Random(2305_18290)
    titles = [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]
    rng.shuffle(titles)
    rows = []
    for i, title in enumerate(titles[:360]):
        text = rng.choice(TEMPLATES).format(
            title=title, genre=rng.choice(GENRES), length=rng.choice(LENGTHS), year=rng.randint(1950, 2026)
        )
        rows.append({"id": f"movie-{i:04d}", "prompt": text})
    out = Path(__file__).with_name("movie_reviews.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {out}")


if __name__ == "__main__":
    main()
