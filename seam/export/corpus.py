"""``seam corpus``: seeded English-like text from a small probabilistic grammar, for training the trained presets.

The grammar is small enough for a model of a few million parameters to learn in minutes, yet it has the
structure that makes perplexity and generations meaningful: agreement between subject and verb and between
"a" and "an" and the next word, noun phrases with adjectives and prepositional phrases, fixed facts, counting,
sums, size comparisons that follow one fixed order, and questions whose answers must be copied from the
sentence before. The same seed always gives the same text; the text is ASCII.
"""

from __future__ import annotations

import random
from pathlib import Path

from seam.runtime.files import write_atomically
from seam.runtime.shell import number

# Ordered from smallest to largest, so that comparisons between them are always true.
_CREATURES = [
    ("mouse", "mice"), ("bird", "birds"), ("cat", "cats"), ("fox", "foxes"), ("dog", "dogs"),
    ("child", "children"), ("woman", "women"), ("man", "men"), ("horse", "horses"), ("elephant", "elephants"),
]
# Outside the size order, so never compared.
_UNRANKED = [
    ("teacher", "teachers"), ("farmer", "farmers"), ("baker", "bakers"), ("king", "kings"),
    ("girl", "girls"), ("boy", "boys"), ("friend", "friends"), ("owl", "owls"),
]
_NOUNS = _CREATURES + _UNRANKED
_PLACES = ["table", "river", "house", "garden", "hill", "road", "tree", "box", "bridge", "forest", "window", "market"]
_ADJECTIVES = ["small", "big", "old", "young", "happy", "quiet", "red", "brown", "clever", "lazy", "angry", "little"]
_PREPOSITIONS = ["on", "under", "near", "behind", "beside", "in", "above", "inside"]
_INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"), ("laughs", "laugh"),
                 ("walks", "walk"), ("eats", "eat"), ("plays", "play")]
_TRANSITIVE = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"), ("watches", "watch"),
               ("helps", "help"), ("carries", "carry"), ("calls", "call")]
_SINGULAR_DETERMINERS = ["the", "a", "this", "that", "every"]
_PLURAL_DETERMINERS = ["the", "these", "those", "some", "many", "two", "three"]
_PLACE_DETERMINERS = ["the", "the", "a", "this", "that"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_FACTS = [
    "the sun is hot", "snow is cold", "grass is green", "the sky is blue", "fish swim in the sea",
    "birds can fly", "a week has seven days", "a cat has four legs", "a bird has two legs", "ice melts in the sun",
    "the moon shines at night", "bread is made from flour", "a year has twelve months", "rain falls from clouds",
]


def _noun_phrase(rng: random.Random, noun: str, determiners: list[str], adjective_odds: float) -> str:
    words = [rng.choice(_ADJECTIVES), noun] if rng.random() < adjective_odds else [noun]
    determiner = rng.choice(determiners)
    if determiner == "a" and words[0][0] in "aeiou":
        determiner = "an"
    return " ".join([determiner, *words])


def _place_phrase(rng: random.Random) -> str:
    return f"{rng.choice(_PREPOSITIONS)} {_noun_phrase(rng, rng.choice(_PLACES), _PLACE_DETERMINERS, 0.3)}"


def _subject(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural, which the verb has to agree with."""
    plural = rng.random() < 0.4
    singular_form, plural_form = rng.choice(_NOUNS)
    if plural:
        return _noun_phrase(rng, plural_form, _PLURAL_DETERMINERS, 0.5), True
    return _noun_phrase(rng, singular_form, _SINGULAR_DETERMINERS, 0.5), False


def _intransitive(rng: random.Random) -> str:
    subject, plural = _subject(rng)
    verb = rng.choice(_INTRANSITIVE)[plural]
    place = f" {_place_phrase(rng)}" if rng.random() < 0.6 else ""
    return f"{subject} {verb}{place}"


def _transitive(rng: random.Random) -> str:
    subject, plural = _subject(rng)
    verb = rng.choice(_TRANSITIVE)[plural]
    obj, _ = _subject(rng)
    place = f" {_place_phrase(rng)}" if rng.random() < 0.3 else ""
    return f"{subject} {verb} {obj}{place}"


def _fact(rng: random.Random) -> str:
    return rng.choice(_FACTS)


def _counting(rng: random.Random) -> str:
    start = rng.randint(1, 8)
    return ", ".join(_NUMBERS[start:start + rng.randint(3, 5)])


def _sum(rng: random.Random) -> str:
    left = rng.randint(0, 6)
    right = rng.randint(0, 12 - left)
    return f"{_NUMBERS[left]} plus {_NUMBERS[right]} is {_NUMBERS[left + right]}"


def _comparison(rng: random.Random) -> str:
    first, second = rng.sample(range(len(_CREATURES)), 2)
    relation = "bigger" if first > second else "smaller"
    return f"the {_CREATURES[first][0]} is {relation} than the {_CREATURES[second][0]}"


def _question(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)[0]
    place = _place_phrase(rng)
    return f"the {noun} is {place}. Where is the {noun}? It is {place}"


_TEMPLATES = [
    (_intransitive, 30), (_transitive, 30), (_fact, 8), (_counting, 8), (_sum, 8), (_comparison, 8), (_question, 8),
]


def _sentence(rng: random.Random) -> str:
    template = rng.choices([t for t, _ in _TEMPLATES], weights=[w for _, w in _TEMPLATES])[0]
    text = template(rng)
    return text[0].upper() + text[1:] + "."


def generate_corpus(sentences: int, seed: int) -> str:
    """``sentences`` sentences drawn from the grammar, in paragraphs of three to six, ending with a newline."""
    rng = random.Random(seed)
    paragraphs, left = [], sentences
    while left > 0:
        length = min(rng.randint(3, 6), left)
        paragraphs.append(" ".join(_sentence(rng) for _ in range(length)))
        left -= length
    return "\n".join(paragraphs) + "\n"


def add_corpus_parser(commands) -> None:
    parser = commands.add_parser("corpus", help="write grammar text like the trained presets learn from")
    parser.add_argument("out", type=Path, help="text file to write")
    parser.add_argument("--sentences", type=number(int, 1), default=1000)
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.set_defaults(handler=_run_corpus)


def _run_corpus(args) -> int:
    text = generate_corpus(args.sentences, args.seed)
    path = write_atomically(args.out, lambda out: out.write(text))
    print(f"{path}: {args.sentences} sentences, {len(text)} bytes")
    return 0
