"""Build the offline smoke-test assets: a synthetic encyclopedia corpus and a byte-level BPE tokenizer.

Everything written here is generated from fixed word lists and templates with a fixed seed, so the
corpus is original text (no borrowed articles) and a rerun produces byte-identical files:

    python scripts/build_smoke_assets.py

Outputs (under recipes/smoke/): train.txt, validation.txt and tokenizer/ (loadable offline with
transformers.AutoTokenizer.from_pretrained). The text follows the WikiText layout: ` = Title = ` and
` = = Section = = ` headings, one paragraph per line, blank lines between blocks. A second, smaller corpus
of another kind, harbour/train.txt and harbour/validation.txt (a harbour master's daily log, one entry per
line), is what recipes/smoke-best.toml mixes with the encyclopedia ([[data.mix]]).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20240611
VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 1024
# Byte budgets for the two splits; the generator stops adding articles once a split reaches its target.
TRAIN_TARGET_BYTES = 300_000
VALIDATION_TARGET_BYTES = 30_000
HARBOUR_SEED = SEED + 1  # its own generator: the encyclopedia's bytes do not depend on the log's
HARBOUR_TRAIN_TARGET_BYTES = 60_000
HARBOUR_VALIDATION_TARGET_BYTES = 12_000

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "recipes" / "smoke"

# --- word lists ------------------------------------------------------------------------------------

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k"]
ONSETS += ["l", "m", "n", "p", "r", "s", "st", "t", "v", "w"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "st", "ck"]
PLACE_SUFFIXES = ["holm", "ford", "wick", "mere", "dale", "by", "stead", "haven", "moor", "well"]
RIVER_SUFFIXES = ["water", "brook", "flow", "run", "wash", ""]

REGIONS = [
    "the Northern Marches",
    "the Amber Coast",
    "the Low Valleys",
    "the Eastern Downs",
    "the Salt Plains",
    "the High Fells",
    "the Western Reach",
    "the Lake Country",
]
TERRAINS = ["hills", "marshes", "forests", "meadows", "cliffs", "moors", "orchards", "wetlands"]
INDUSTRIES = ["fishing", "weaving", "farming", "mining", "brewing", "shipbuilding", "pottery", "milling"]
GOODS = ["wool", "salt", "timber", "barley", "copper", "cheese", "glass", "rope"]
BUILDINGS = ["a stone bridge", "an old market hall", "a clock tower", "a harbour wall", "a public library"]
BUILDINGS += ["a grain store", "a small chapel", "a lighthouse"]
EVENTS = ["a great flood", "a long drought", "a harsh winter", "a fire in the old quarter", "a trade dispute"]
ADJECTIVES = ["quiet", "busy", "small", "prosperous", "remote", "old", "growing", "modest"]
SEASONS = ["spring", "summer", "autumn", "winter"]
FESTIVALS = ["a lantern fair", "a harvest market", "a boat race", "a music festival", "a horse show"]
ANIMALS = ["otters", "herons", "trout", "kingfishers", "beavers", "eels", "swans", "salmon"]
TREES = ["willows", "alders", "oaks", "birches", "poplars", "ash trees"]

FIRST_NAMES = ["Alma", "Bertil", "Cora", "Dorian", "Edda", "Falk", "Greta", "Hollis", "Ines", "Jorund"]
FIRST_NAMES += ["Kasia", "Lorne", "Mira", "Nils", "Oda", "Per", "Runa", "Sten", "Tova", "Ulric", "Vera"]
FIRST_NAMES += ["Wendel"]
PROFESSIONS = ["engineer", "painter", "botanist", "mapmaker", "composer", "physician", "architect", "poet"]
FIELDS = {
    "engineer": "engineering",
    "painter": "painting",
    "botanist": "botany",
    "mapmaker": "cartography",
    "composer": "music",
    "physician": "medicine",
    "architect": "architecture",
    "poet": "poetry",
}
WORKS = {
    "engineer": ["a canal lock", "a water pump", "a railway bridge", "a steam crane"],
    "painter": ["a series of river landscapes", "a portrait of the town council", "a large harbour scene"],
    "botanist": ["a survey of marsh plants", "a guide to mountain flowers", "a study of orchard trees"],
    "mapmaker": ["a map of the coast", "an atlas of the valleys", "a chart of the northern lakes"],
    "composer": ["a symphony in four parts", "a set of choral songs", "an opera about the sea"],
    "physician": ["a treatise on fevers", "a hospital for sailors", "a study of winter illness"],
    "architect": ["a new town hall", "a covered market", "a museum of local history"],
    "poet": ["a book of sea poems", "a long poem about the river", "a collection of winter verses"],
}
INSTITUTIONS = ["the Royal Academy", "the Guild of Crafts", "the College of Sciences", "the Free School"]
TRAITS = ["patient", "careful", "restless", "generous", "stubborn", "curious", "modest", "ambitious"]

INVENTION_NOUNS = ["loom", "lamp", "pump", "clock", "kiln", "press", "compass", "plough", "sail", "scale"]
INVENTION_ADJECTIVES = ["folding", "double", "rotary", "tidal", "spring", "steam", "balanced", "twin"]
MATERIALS = ["brass", "oak", "iron", "copper", "glass", "steel", "leather", "bronze"]
PURPOSES = ["measure the tides", "weave cloth faster", "light the streets", "lift water from wells"]
PURPOSES += ["keep time at sea", "grind grain", "print notices", "weigh goods at market"]
PARTS = ["a wheel", "a lever", "a spring", "a valve", "a gear", "a chain", "a drum", "a frame"]
USERS = ["farmers", "sailors", "weavers", "millers", "merchants", "miners", "printers", "bakers"]


@dataclass(frozen=True)
class SplitStats:
    """Sizes of one written split."""

    name: str
    articles: int
    bytes: int
    tokens: int


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _base_name(rng: random.Random) -> str:
    return "".join(_syllable(rng) for _ in range(rng.choice([1, 2]))).capitalize()


def _year(rng: random.Random, low: int = 1620, high: int = 1890) -> int:
    return rng.randrange(low, high)


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class NameBook:
    """Hands out invented names, never the same one twice, so articles across splits stay distinct."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        while True:
            name = make()
            if name not in self._used:
                self._used.add(name)
                return name

    def place(self) -> str:
        return self._fresh(lambda: _base_name(self._rng) + self._rng.choice(PLACE_SUFFIXES))

    def river(self) -> str:
        return self._fresh(
            lambda: ("River " + _base_name(self._rng) + self._rng.choice(RIVER_SUFFIXES)).strip()
        )

    def person(self) -> str:
        return self._fresh(lambda: self._rng.choice(FIRST_NAMES) + " " + _base_name(self._rng) + "son")

    def invention(self) -> str:
        return self._fresh(
            lambda: (
                f"{_base_name(self._rng)} {self._rng.choice(INVENTION_ADJECTIVES)} "
                f"{self._rng.choice(INVENTION_NOUNS)}"
            )
        )


# --- article writers -------------------------------------------------------------------------------
# Each writer returns (title, [(section heading or None, [paragraph, ...]), ...]).

Article = tuple[str, list[tuple[str | None, list[str]]]]


def _place_article(rng: random.Random, names: NameBook) -> Article:
    town = names.place()
    region = rng.choice(REGIONS)
    river = names.river()
    industry, industry2 = rng.sample(INDUSTRIES, 2)
    good = rng.choice(GOODS)
    founded = _year(rng, 1100, 1500)
    population = rng.randrange(8, 95) * 100
    adjective = rng.choice(ADJECTIVES)
    neighbour = names.place()

    intro = [
        f"{town} is {_with_article(adjective)} town in {region}, on the banks of the {river}.",
        f"It lies between the {rng.choice(TERRAINS)} to the north and the {rng.choice(TERRAINS)} to the south.",
        f"The town has a population of about {population} people and is known for {industry}.",
    ]
    if rng.random() < 0.5:
        intro.append(f"It is the largest town between {neighbour} and the sea.")
    history = [
        f"{town} was founded in {founded} as a small {industry} village.",
        (
            f"In {founded + rng.randrange(40, 200)} the village was granted a market charter, "
            f"and traders came from {neighbour} to buy {good}."
        ),
        f"The town grew quickly during the {rng.choice(['sixteenth', 'seventeenth', 'eighteenth'])} century.",
        f"In {_year(rng)} {rng.choice(EVENTS)} damaged much of the town, and many families moved to {neighbour}.",
        f"The town recovered slowly, and by {_year(rng, 1800, 1900)} it was again a centre of {industry2}.",
    ]
    economy = [
        f"The economy of {town} is based on {industry} and {industry2}.",
        f"Local {good} is sold in the markets of {region}.",
        f"Most of the {good} is carried down the {river} to the coast.",
        f"A railway line to {neighbour} was opened in {_year(rng, 1840, 1900)}.",
    ]
    landmarks = [
        f"The best known building in {town} is {rng.choice(BUILDINGS)}, built in {_year(rng)}.",
        f"The town also has {rng.choice(BUILDINGS)} and {rng.choice(BUILDINGS)}.",
        (
            f"Every {rng.choice(SEASONS)} the town holds {rng.choice(FESTIVALS)}, which draws visitors from "
            f"across {region}."
        ),
    ]
    sections: list[tuple[str | None, list[str]]] = [(None, [" ".join(intro)])]
    sections.append(("History", [" ".join(history[:3]), " ".join(history[3:])]))
    sections.append(("Economy", [" ".join(economy)]))
    if rng.random() < 0.7:
        sections.append(("Landmarks", [" ".join(landmarks)]))
    return town, sections


def _river_article(rng: random.Random, names: NameBook) -> Article:
    river = names.river()
    region = rng.choice(REGIONS)
    source, mouth, town = names.place(), names.place(), names.place()
    length = rng.randrange(20, 400)
    tributaries = [names.river() for _ in range(rng.randrange(1, 4))]
    animal, animal2 = rng.sample(ANIMALS, 2)

    intro = [
        f"The {river} is a river in {region}.",
        (
            f"It is about {length} kilometres long and flows from the {rng.choice(TERRAINS)} near {source} "
            f"to the sea at {mouth}."
        ),
        f"The river passes through the town of {town}.",
    ]
    course = [
        f"The {river} rises in the {rng.choice(TERRAINS)} above {source}.",
        (
            f"It flows {rng.choice(['north', 'south', 'east', 'west'])} through a wide valley of "
            f"{rng.choice(TERRAINS)} and {rng.choice(TERRAINS)}."
        ),
        (
            f"Its main {'tributary is' if len(tributaries) == 1 else 'tributaries are'} the "
            f"{_join_list(tributaries)}."
        ),
        f"Below {town} the river becomes wide and slow, and it is lined with {rng.choice(TREES)}.",
    ]
    history = [
        f"The river was used to carry {rng.choice(GOODS)} from {town} to {mouth} for many centuries.",
        f"A canal joining the {river} to the {tributaries[0]} was dug in {_year(rng)}.",
        f"In {_year(rng)} {rng.choice(EVENTS)} changed the course of the river near {mouth}.",
    ]
    wildlife = [
        f"The {river} is home to {animal} and {animal2}.",
        f"In {rng.choice(SEASONS)} large numbers of {rng.choice(ANIMALS)} can be seen near {source}.",
        "The banks of the river are protected as a nature reserve.",
    ]
    sections: list[tuple[str | None, list[str]]] = [(None, [" ".join(intro)])]
    sections.append(("Course", [" ".join(course)]))
    sections.append(("History", [" ".join(history)]))
    if rng.random() < 0.7:
        sections.append(("Wildlife", [" ".join(wildlife)]))
    return river, sections


def _person_article(rng: random.Random, names: NameBook) -> Article:
    person = names.person()
    first = person.split()[0]
    surname = person.split()[1]
    profession = rng.choice(PROFESSIONS)
    field = FIELDS[profession]
    birthplace, workplace = names.place(), names.place()
    born = _year(rng, 1600, 1850)
    died = born + rng.randrange(35, 90)
    work, work2 = rng.sample(WORKS[profession], 2)
    institution = rng.choice(INSTITUTIONS)
    trait = rng.choice(TRAITS)
    pronoun, possessive, objective = rng.choice([("He", "his", "him"), ("She", "her", "her")])

    intro = [
        f"{person} ( {born} – {died} ) was {_with_article(profession)} from {birthplace} in {rng.choice(REGIONS)}.",
        f"{pronoun} is best known for {work}.",
    ]
    early = [
        f"{first} was born in {birthplace} in {born}, the child of a family of {rng.choice(USERS)}.",
        (
            f"As a young {'man' if pronoun == 'He' else 'woman'}, {pronoun.lower()} studied {field} "
            f"at {institution}."
        ),
        f"In {born + rng.randrange(18, 30)} {pronoun.lower()} moved to {workplace}.",
    ]
    career = [
        f"In {workplace} {surname} began work on {work}, which was finished in {born + rng.randrange(30, 45)}.",
        f"The work made {possessive} name known across the country.",
        f"{pronoun} later completed {work2}.",
        f"Friends described {surname} as {trait} and {rng.choice(TRAITS)}.",
    ]
    legacy = [
        f"{surname} died in {workplace} in {died}.",
        f"A street in {birthplace} is named after {objective}.",
        f"{institution[0].upper()}{institution[1:]} still awards a prize for {field} in {possessive} name.",
    ]
    sections: list[tuple[str | None, list[str]]] = [(None, [" ".join(intro)])]
    sections.append(("Early life", [" ".join(early)]))
    sections.append(("Career", [" ".join(career)]))
    sections.append(("Legacy", [" ".join(legacy)]))
    return person, sections


def _invention_article(rng: random.Random, names: NameBook) -> Article:
    invention = names.invention()
    short = " ".join(invention.split()[1:])
    inventor = names.person()
    town = names.place()
    year = _year(rng)
    material, material2 = rng.sample(MATERIALS, 2)
    purpose = rng.choice(PURPOSES)
    part, part2 = rng.sample(PARTS, 2)
    users = rng.choice(USERS)

    intro = [
        f"The {invention} is a device used to {purpose}.",
        f"It was invented by {inventor} in {town} in {year}.",
        f"The {short} was widely used by {users} until the end of the century.",
    ]
    design = [
        f"The {invention} is made of {material} and {material2}.",
        f"It has {part} that turns {part2}, so that one person can {purpose}.",
        "Early models were heavy, but later models were small enough to carry.",
    ]
    history = [
        f"{inventor} built the first {short} in a workshop in {town}.",
        f"In {year + rng.randrange(2, 20)} the design was shown at a fair in {names.place()}.",
        f"Within a few years {users} across {rng.choice(REGIONS)} were using it.",
        f"The {short} was replaced by newer machines in {year + rng.randrange(40, 120)}.",
    ]
    sections: list[tuple[str | None, list[str]]] = [(None, [" ".join(intro)])]
    sections.append(("Design", [" ".join(design)]))
    sections.append(("History", [" ".join(history)]))
    return invention, sections


# --- the harbour log: a second corpus of another kind ---------------------------------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
WEATHER = ["fair", "fog at dawn", "rain", "squalls", "a heavy swell", "clear skies", "low cloud", "sleet"]
VESSELS = ["sloop", "brig", "barge", "schooner", "ketch", "lugger", "cutter"]


def _log_entry(rng: random.Random, names: NameBook, day: int, month: str, year: int) -> str:
    """One day of the log: the weather, then ships in and out with their cargo."""
    lines = [
        f"{day} {month} {year}. Wind {rng.choice(WINDS)}, force {rng.randrange(1, 9)}; {rng.choice(WEATHER)}."
    ]
    for _ in range(rng.randrange(1, 4)):
        vessel = f"the {rng.choice(VESSELS)} {_base_name(rng)}"
        if rng.random() < 0.5:
            lines.append(
                f"In: {vessel} from {names.place()}, {rng.randrange(4, 90)} tons of {rng.choice(GOODS)}, "
                f"master {names.person()}."
            )
        else:
            lines.append(
                f"Out: {vessel} for {names.place()} with {rng.choice(GOODS)}, {rng.randrange(2, 14)} crew."
            )
    if rng.random() < 0.3:
        lines.append(
            f"Harbour dues paid: {rng.randrange(3, 60)} shillings. Tide high at {rng.randrange(1, 12)} o'clock."
        )
    return " " + " ".join(lines) + " \n"


def generate_log(rng: random.Random, names: NameBook, target_bytes: int, year: int) -> tuple[str, int]:
    """Daily entries, a month heading (` = Month Year = `) every 28 days, until target_bytes."""
    entries: list[str] = []
    size, day = 0, 0
    while size < target_bytes:
        month = MONTHS[(day // 28) % len(MONTHS)]
        if day % 28 == 0:
            entries.append(f" = {month} {year + day // (28 * len(MONTHS))} = \n")
        entries.append(_log_entry(rng, names, day % 28 + 1, month, year + day // (28 * len(MONTHS))))
        size += len(entries[-1].encode("utf-8")) + 1
        day += 1
    return "\n".join(entries), day


ARTICLE_WRITERS = [_place_article, _river_article, _person_article, _invention_article]


def _render(article: Article) -> str:
    """Lay out one article like WikiText: headings and paragraphs on their own lines, blank lines between."""
    title, sections = article
    blocks = [f" = {title} = "]
    for heading, paragraphs in sections:
        if heading is not None:
            blocks.append(f" = = {heading} = = ")
        blocks.extend(f" {paragraph} " for paragraph in paragraphs)
    return "\n\n".join(blocks) + "\n"


def generate_split(rng: random.Random, names: NameBook, target_bytes: int) -> tuple[str, int]:
    """Articles in a fixed rotation of kinds until the split reaches target_bytes (UTF-8)."""
    articles: list[str] = []
    size = 0
    while size < target_bytes:
        writer = ARTICLE_WRITERS[len(articles) % len(ARTICLE_WRITERS)]
        text = _render(writer(rng, names))
        articles.append(text)
        size += len(text.encode("utf-8")) + 1  # +1 for the blank line between articles
    return "\n".join(articles), len(articles)


def train_tokenizer(train_path: Path, tokenizer_dir: Path) -> object:
    """Byte-level BPE like GPT-2, trained on train_path only, saved so AutoTokenizer loads it offline."""
    from clm_runner.models.bpe import as_transformers_tokenizer, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(vocab_size=VOCAB_SIZE, files=[train_path], special_tokens=[EOS_TOKEN])
    wrapped = as_transformers_tokenizer(
        tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    wrapped.save_pretrained(str(tokenizer_dir))
    return wrapped


def build(output_dir: Path) -> list[SplitStats]:
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    names = NameBook(rng)
    train_text, train_articles = generate_split(rng, names, TRAIN_TARGET_BYTES)
    validation_text, validation_articles = generate_split(rng, names, VALIDATION_TARGET_BYTES)
    splits = {"train": (train_text, train_articles), "validation": (validation_text, validation_articles)}
    for name, (text, _) in splits.items():
        # newline="\n" keeps the bytes identical on every platform.
        (output_dir / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")

    tokenizer = train_tokenizer(output_dir / "train.txt", output_dir / "tokenizer")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(output_dir / "tokenizer"))
    stats = []
    for name, (text, articles) in splits.items():
        # verbose=False: a whole split is far longer than model_max_length, which is expected here.
        ids = reloaded(text, verbose=False)["input_ids"]
        if reloaded.decode(ids) != text:
            raise SystemExit(f"tokenizer does not round-trip the {name} split; the assets are unusable")
        stats.append(SplitStats(name, articles, len(text.encode("utf-8")), len(ids)))
    harbour_rng = random.Random(HARBOUR_SEED)
    harbour_names = NameBook(harbour_rng)
    (output_dir / "harbour").mkdir(exist_ok=True)
    for name, target, year in (
        ("train", HARBOUR_TRAIN_TARGET_BYTES, 1840),
        ("validation", HARBOUR_VALIDATION_TARGET_BYTES, 1870),
    ):
        text, days = generate_log(harbour_rng, harbour_names, target, year)
        (output_dir / "harbour" / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
        ids = reloaded(text, verbose=False)["input_ids"]
        if reloaded.decode(ids) != text:
            raise SystemExit(
                f"tokenizer does not round-trip the harbour {name} split; the assets are unusable"
            )
        stats.append(SplitStats(f"harbour/{name}", days, len(text.encode("utf-8")), len(ids)))
    print(f"vocab size: {len(tokenizer)} (reloaded: {len(reloaded)})")
    for split in stats:
        print(f"{split.name}: {split.articles} articles, {split.bytes} bytes, {split.tokens} tokens")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    build(parser.parse_args().output_dir)


if __name__ == "__main__":
    main()
