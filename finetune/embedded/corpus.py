"""The embedded default data: a small invented world, and the instruction rows, preference pairs and prose about it.

Nothing can be downloaded when the pipeline runs, so the project generates its own data, and every template here was
written for it. Each answer follows from the row's context, from a simple rule, or from a fact table that the
pre-training prose states over and over, in one fixed phrasing per task: a tiny model can learn it in minutes, and
token-overlap metrics (F1, ROUGE-L) then reward real learning. The lexicon is the same for every seed; the people and
towns are drawn from the seed, and every row, pair and paragraph made from one seed agrees on them.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

DOLLY_CATEGORIES = ("open_qa", "closed_qa", "information_extraction", "summarization",
                    "brainstorming", "classification", "general_qa", "creative_writing")
REJECTED_KINDS = ("wrong_fact", "verbose", "off_format")

LONG_ROW_CHARS = 2500  # the pipeline's data.max_chars: rows this long must be dropped
NEAR_LIMIT_CHARS = 2300  # rows from here to just under the limit must be kept
NORMAL_MAX_CHARS = 600
MIN_ROWS_FOR_SPECIALS = 100  # smaller sets are all valid, normal rows

# ---------------------------------------------------------------------------------------------------------------
# The fixed lexicon

COLOURS = ("red", "blue", "green", "yellow", "purple", "white", "black", "brown", "grey", "pink", "orange")
PETS = ("cat", "dog", "goat", "parrot", "rabbit", "hen", "tortoise", "pony", "canary", "hamster")
JOB_TOOLS = {
    "baker": ("an oven", "a sack of flour", "a rolling pin"),
    "farmer": ("a plough", "a bag of seeds", "a strong horse"),
    "weaver": ("a loom", "a basket of wool", "a pair of scissors"),
    "potter": ("a wheel", "a lump of clay", "a hot kiln"),
    "fisher": ("a boat", "a net", "a fishing line"),
    "smith": ("an anvil", "a hammer", "a hot fire"),
    "teacher": ("a slate", "a piece of chalk", "a box of books"),
    "miller": ("a mill", "a sack of grain", "a sieve"),
    "builder": ("a ladder", "a pile of bricks", "a trowel"),
    "healer": ("a bag of herbs", "a roll of clean cloth", "a small knife"),
    "carpenter": ("a saw", "a plane", "a box of nails"),
    "sailor": ("a ship", "a map", "a long rope"),
}
FRUIT_COLOURS = {"apple": "red", "pear": "green", "plum": "purple", "cherry": "red", "lemon": "yellow",
                 "grape": "purple", "peach": "orange", "fig": "purple", "melon": "green", "banana": "yellow",
                 "lime": "green", "apricot": "orange"}
VEGETABLE_COLOURS = {"leek": "green", "carrot": "orange", "onion": "white", "cabbage": "green", "turnip": "white",
                     "potato": "brown", "radish": "red", "beet": "purple", "parsnip": "white", "lettuce": "green",
                     "bean": "green"}
FOOD_COLOURS = FRUIT_COLOURS | VEGETABLE_COLOURS
FOODS = tuple(FOOD_COLOURS)


@dataclass(frozen=True)
class Animal:
    colour: str
    home: str
    sound: str  # what it does, as a verb: "moos"
    food: str
    legs: int
    farm: bool


ANIMALS = {
    "cow": Animal("brown", "barn", "moos", "grass", 4, True),
    "sheep": Animal("white", "field", "bleats", "grass", 4, True),
    "pig": Animal("pink", "sty", "grunts", "roots", 4, True),
    "horse": Animal("brown", "stable", "neighs", "hay", 4, True),
    "goose": Animal("white", "pond", "honks", "seeds", 2, True),
    "frog": Animal("green", "pond", "croaks", "flies", 4, False),
    "owl": Animal("brown", "tree", "hoots", "mice", 2, False),
    "crow": Animal("black", "nest", "caws", "worms", 2, False),
    "bee": Animal("yellow", "hive", "buzzes", "nectar", 6, False),
    "wolf": Animal("grey", "den", "howls", "meat", 4, False),
    "fox": Animal("red", "den", "barks", "eggs", 4, False),
    "mouse": Animal("grey", "hole", "squeaks", "seeds", 4, False),
    "bear": Animal("brown", "cave", "growls", "honey", 4, False),
    "bat": Animal("black", "cave", "clicks", "moths", 2, False),
    "deer": Animal("brown", "forest", "bellows", "leaves", 4, False),
    "snake": Animal("green", "burrow", "hisses", "eggs", 0, False),
    "cricket": Animal("black", "meadow", "chirps", "leaves", 6, False),
}
ANIMAL_NAMES = tuple(ANIMALS)
LEG_WORDS = {0: "no", 2: "two", 4: "four", 6: "six"}
OBJECT_USES = {
    "rope": ("tie up a boat", "climb a wall", "pull a cart"),
    "bucket": ("carry water", "wash a floor", "collect apples"),
    "knife": ("cut bread", "peel a pear", "carve wood"),
    "basket": ("carry eggs", "keep bread", "pick berries"),
    "blanket": ("keep warm", "cover a bed", "sit on the grass"),
    "candle": ("light a room", "read at night", "warm your hands"),
    "ladder": ("reach a roof", "pick cherries", "paint a wall"),
    "hammer": ("drive a nail", "break a stone", "fix a fence"),
    "spoon": ("stir soup", "eat porridge", "measure sugar"),
    "broom": ("sweep a floor", "clean a yard", "brush away snow"),
    "lantern": ("light a path", "signal a boat", "find a lost key"),
    "sack": ("carry grain", "store potatoes", "keep seeds dry"),
    "cup": ("drink tea", "hold pens", "catch rain"),
    "needle": ("sew a shirt", "mend a sock", "fix a sail"),
    "shovel": ("dig a hole", "move sand", "plant a tree"),
    "towel": ("dry your hands", "wrap bread", "wipe a table"),
}
OBJECT_NAMES = tuple(OBJECT_USES)

TOWN_NAMES = ("Osper", "Luneth", "Tavis", "Merrin", "Caddow", "Fenlow", "Ardel", "Quenby", "Solbeck", "Varro",
              "Wendle", "Ilmar", "Rostyn", "Hollin", "Pemra")
RIVER_NAMES = ("Vell", "Osk", "Sirel", "Dunna", "Kessa", "Ilde", "Brenn", "Aulo")
REGIONS = ("the north", "the south", "the east", "the west", "the hills", "the valley")
TOWN_SIZES = ("village", "town", "city")
TRADE_GOODS = {"fishing": "fresh fish", "farming": "fresh eggs", "weaving": "wool cloth", "mining": "copper pots",
               "pottery": "clay bowls", "trading": "sweet spices"}
LANDMARKS = ("old mill", "stone bridge", "bell tower", "clock tower", "north gate", "town well", "great hall",
             "harbour wall", "old castle", "market hall", "red lighthouse", "round tower", "white chapel",
             "long barn", "copper fountain")
CHRONICLE_EVENTS = (
    "the river {river} flooded the lower streets", "a hard winter froze the river {river} for {n} weeks",
    "traders from {other} came to buy {goods}", "a fire burned {n} houses near the {landmark}",
    "the {landmark} was repaired after a great storm", "a fair was held and {n} hundred people came",
    "the harvest failed and bread was scarce", "a new school was opened near the market",
    "the town council chose a new leader", "{town} and {other} agreed to keep the peace",
    "a sickness spread and the healers worked day and night", "a new road was laid from {town} to {other}",
    "the market square was paved with grey stone", "a storm tore the roofs from {n} barns",
    "a second bridge was built over the river {river}", "the people planted {n} hundred apple trees",
)
WEATHERS = ("rainy", "sunny", "windy", "snowy", "foggy", "cold", "warm")
SEASONS = ("spring", "summer", "autumn", "winter")
TIMES_OF_DAY = ("dawn", "noon", "dusk", "night")
CHRONICLE_LENGTH = 60
N_PEOPLE = 96
FIELDS = ("town", "job", "age", "colour", "pet")

# ---------------------------------------------------------------------------------------------------------------
# The seeded world


@dataclass(frozen=True)
class Town:
    name: str
    region: str
    river: str
    size: str
    trade: str
    landmark: str
    founded: int
    chronicle: tuple[tuple[int, str], ...]  # (year, sentence), oldest first

    def facts(self) -> dict[str, str]:
        return {"name": self.name, "region": self.region, "river": self.river, "size": self.size,
                "trade": self.trade, "landmark": self.landmark, "founded": str(self.founded),
                "goods": TRADE_GOODS[self.trade], "a_trade": _a(self.trade)}


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    town: Town
    job: str
    age: int
    colour: str
    pet: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def facts(self) -> dict[str, str]:
        return {"name": self.name, "first": self.first, "town": self.town.name, "job": self.job,
                "age": str(self.age), "colour": self.colour, "pet": self.pet, "a_job": _a(self.job),
                "a_pet": _a(self.pet), "river": self.town.river, "landmark": self.town.landmark}


@dataclass(frozen=True)
class World:
    towns: tuple[Town, ...]
    people: tuple[Person, ...]

    def residents(self, town: Town) -> list[Person]:
        return [person for person in self.people if person.town.name == town.name]


T = TypeVar("T")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _and_list(items: Sequence[str]) -> str:
    return " and ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + ", and " + items[-1]


def _other(rng: random.Random, options: Sequence[T], value: T) -> T:
    return rng.choice([option for option in options if option != value])


def _near_miss(rng: random.Random, value: int, spread: int) -> int:
    delta = rng.randint(1, spread)
    return value + delta if value - delta < 0 or rng.random() < 0.5 else value - delta


_LETTERS = {"C": "bdfgklmnprstvz", "V": "aeiou", "E": "aiou", "F": "lnrsk"}  # E: no final e, F: final consonant
_RESERVED = {word.lower() for word in (*TOWN_NAMES, *RIVER_NAMES, *COLOURS, *PETS, *JOB_TOOLS, *FOODS,
                                       *ANIMALS, *OBJECT_USES)}


def _invented_names(rng: random.Random, pattern: str, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_LETTERS[letter]) for letter in pattern).capitalize()
        if name.lower() not in _RESERVED and name not in names:
            names.append(name)
    return names


def _chronicle(rng: random.Random, name: str, river: str, landmark: str, goods: str, founded: int
               ) -> tuple[tuple[int, str], ...]:
    year, entries = founded, []
    for _ in range(CHRONICLE_LENGTH):
        year += rng.randint(3, 15)
        event = rng.choice(CHRONICLE_EVENTS).format(
            town=name, river=river, landmark=landmark, goods=goods, n=rng.randint(2, 9),
            other=_other(rng, TOWN_NAMES, name))
        entries.append((year, f"In the year {year}, {event}."))
    return tuple(entries)


def _make_town(rng: random.Random, name: str, landmark: str) -> Town:
    river, trade, founded = rng.choice(RIVER_NAMES), rng.choice(tuple(TRADE_GOODS)), rng.randint(100, 400)
    return Town(name, rng.choice(REGIONS), river, rng.choice(TOWN_SIZES), trade, landmark, founded,
                _chronicle(rng, name, river, landmark, TRADE_GOODS[trade], founded))


@functools.lru_cache(maxsize=8)
def _world(seed: int) -> World:
    rng = random.Random(f"world:{seed}")
    towns = tuple(_make_town(rng, name, landmark)
                  for name, landmark in zip(TOWN_NAMES, rng.sample(LANDMARKS, len(TOWN_NAMES))))
    homes = [towns[i % len(towns)] for i in range(N_PEOPLE)]  # six or seven residents in every town
    rng.shuffle(homes)
    firsts, lasts = _invented_names(rng, "CVCE", N_PEOPLE), _invented_names(rng, "CVFCVF", N_PEOPLE)
    return World(towns, tuple(
        Person(first, last, home, rng.choice(tuple(JOB_TOOLS)), rng.randint(18, 80), rng.choice(COLOURS),
               rng.choice(PETS))
        for first, last, home in zip(firsts, lasts, homes)))


def _with_wrong_fact(world: World, rng: random.Random, person: Person, field: str) -> Person:
    if field == "age":
        return replace(person, age=_near_miss(rng, person.age, 6))
    if field == "town":
        return replace(person, town=_other(rng, world.towns, person.town))
    options = {"job": tuple(JOB_TOOLS), "colour": COLOURS, "pet": PETS}[field]
    return replace(person, **{field: _other(rng, options, getattr(person, field))})


def _with_wrong_town_fact(rng: random.Random, town: Town, field: str) -> Town:
    if field == "founded":
        return replace(town, founded=_near_miss(rng, town.founded, 30))
    options = {"river": RIVER_NAMES, "region": REGIONS, "size": TOWN_SIZES, "trade": tuple(TRADE_GOODS)}[field]
    return replace(town, **{field: _other(rng, options, getattr(town, field))})


# ---------------------------------------------------------------------------------------------------------------
# Sentences shared by the tasks and the prose

_BIO_TEMPLATES = {
    "town": ("{who} lives in {town}.", "{who} has a house in {town}."),
    "job": ("{who} works as {a_job}.", "{who} has a job as {a_job}."),
    "age": ("{who} is {age} years old.", "{who} turned {age} this spring.", "The age of {who} is {age}."),
    "colour": ("{who}'s favourite colour is {colour}.", "{who} likes the colour {colour} best."),
    "pet": ("{who} keeps {a_pet} at home.", "{who} has a pet {pet}."),
}
_DAILY_LIFE = ("Each morning {first} walks to the market in {town}.",
               "On rest days {first} takes the {pet} for a walk along the river {river}.",
               "{first} lives close to the {landmark}.", "Friends say that {first} is kind and works hard.")


def _bio(person: Person, rng: random.Random) -> list[str]:
    """One sentence per fact in a random order; only the first names the person in full."""
    fields = list(FIELDS)
    rng.shuffle(fields)
    return [rng.choice(_BIO_TEMPLATES[field]).format(who=person.name if i == 0 else person.first, **person.facts())
            for i, field in enumerate(fields)]


def _person_summary(person: Person) -> str:
    return "{name}, aged {age}, is {a_job} from {town} who keeps {a_pet} and likes {colour}.".format(**person.facts())


def _story(person: Person, weather: str, season: str) -> str:
    return ("{name} was {a_job} in {town}. On a {weather} {season} morning, {first} fed the {pet} before work. "
            "At night {first} and the {pet} rested by the fire.").format(weather=weather, season=season,
                                                                          **person.facts())


def _town_intro(town: Town) -> str:
    return "{name} is {a_trade} {size} in {region}.".format(**town.facts())


def _town_description(town: Town, rng: random.Random) -> list[str]:
    details = [template.format(**town.facts()) for template in (
        "The river {river} flows through {name}.", "{name} was founded in the year {founded}.",
        "Most people in {name} work in {trade}.", "The best known sight of {name} is the {landmark}.",
        "Visitors come to buy {goods} at the market.")]
    rng.shuffle(details)
    return [_town_intro(town), *details]


def _town_summary(town: Town) -> str:
    return "{name} is {a_trade} {size} in {region} on the river {river}, founded in the year {founded}.".format(
        **town.facts())


def _chronicle_summary(town: Town, entries: Sequence[tuple[int, str]]) -> str:
    return ("{name} is {a_trade} {size} in {region} on the river {river}, and this part of its chronicle records "
            "{count} events from the year {start} to the year {end}.").format(
        count=len(entries), start=entries[0][0], end=entries[-1][0], **town.facts())


def _visit(who: str, town: Town) -> str:
    line = "In {name}, {who} can walk along the river {river}, visit the {landmark}, and buy {goods} at the market."
    return line.format(who=who, **town.facts())


def _uses(obj: str, uses: Sequence[str]) -> str:
    return f"You can use {_a(obj)} {_and_list([f'to {use}' for use in uses])}."


def _poem(colour: str, name: str, animal: Animal, time: str) -> str:
    return (f"In the {animal.home} lives {_a(colour)} {name},\n"
            f"it {animal.sound} at {time} and eats {animal.food} every day.")


def _labelled(items: Sequence[str], labels: Sequence[str]) -> str:
    return ", ".join(f"{item}: {label}" for item, label in zip(items, labels)) + "."


def _food_class(food: str) -> str:
    return "fruit" if food in FRUIT_COLOURS else "vegetable"


def _parity(number: str) -> str:
    return "even" if int(number) % 2 == 0 else "odd"


def _animal_class(name: str) -> str:
    return "farm animal" if ANIMALS[name].farm else "wild animal"


# ---------------------------------------------------------------------------------------------------------------
# Task generators: one Example per call, all randomness from the rng passed in


@dataclass(frozen=True)
class Example:
    category: str
    instruction: str
    context: str
    response: str
    wrong: str  # the response's own form with one plausible wrong fact: the "wrong_fact" rejected answer


Fact = tuple[str, str, str]  # question, answer, the answer with a wrong fact
Task = Callable[[World, random.Random], Example]

_FACT_QUESTIONS = {
    "town": ("Where does {name} live?", "In which town does {name} live?", "Using the text, say where {name} lives."),
    "job": ("What is {name}'s job?", "What does {name} do for work?", "Using the text, say what work {name} does."),
    "age": ("How old is {name}?", "What is the age of {name}?", "Using the text, say how old {name} is."),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?",
               "Using the text, name the favourite colour of {name}."),
    "pet": ("What pet does {name} keep?", "Which animal does {name} keep as a pet?",
            "Using the text, say which pet {name} keeps."),
}
_FACT_ANSWERS = {"town": "{name} lives in {town}.", "job": "{name} works as {a_job}.",
                 "age": "{name} is {age} years old.", "colour": "{name}'s favourite colour is {colour}.",
                 "pet": "{name} keeps {a_pet}."}
_FIELD_WORDS = {"town": "town", "job": "job", "age": "age", "colour": "favourite colour", "pet": "pet"}


def _bio_context(world: World, rng: random.Random, person: Person) -> str:
    """The person's bio, and in a third of the rows another person's too, so the model must pick the right one."""
    people = [person]
    if rng.random() < 1 / 3:
        people.append(_other(rng, world.people, person))
        rng.shuffle(people)
    return " ".join(sentence for someone in people for sentence in _bio(someone, rng))


def _closed_qa(world: World, rng: random.Random) -> Example:
    person, field = rng.choice(world.people), rng.choice(FIELDS)
    instruction = rng.choice(_FACT_QUESTIONS[field]).format(name=person.name)
    wrong = _with_wrong_fact(world, rng, person, field)
    return Example("closed_qa", instruction, _bio_context(world, rng, person),
                   _FACT_ANSWERS[field].format(**person.facts()), _FACT_ANSWERS[field].format(**wrong.facts()))


def _record(person: Person, fields: Sequence[str]) -> str:
    return " ".join(f"{_cap(field)}: {person.facts()[field]}." for field in fields)


def _extract_fields(world: World, rng: random.Random) -> Example:
    person = rng.choice(world.people)
    fields = sorted(rng.sample(FIELDS, rng.randint(2, 4)), key=FIELDS.index)
    instruction = rng.choice(("Extract the {wanted} of {name} from the text.",
                              "From the passage, give the {wanted} of {name}.",
                              "Read the text and pull out the {wanted} of {name}.")).format(
        wanted=_and_list([_FIELD_WORDS[field] for field in fields]), name=person.name)
    wrong = _with_wrong_fact(world, rng, person, rng.choice(fields))
    return Example("information_extraction", instruction, _bio_context(world, rng, person),
                   _record(person, fields), _record(wrong, fields))


def _extract_names(world: World, rng: random.Random) -> Example:
    town = rng.choice(world.towns)
    named = rng.sample(world.residents(town), rng.randint(2, 4))
    mentions = [rng.choice(_BIO_TEMPLATES[rng.choice(FIELDS)]).format(who=p.name, **p.facts()) for p in named]
    context = " ".join([_town_intro(town), *mentions, f"The {town.landmark} stands near the river {town.river}."])
    names = [person.name for person in named]
    wrong = list(names)
    wrong[rng.randrange(len(wrong))] = rng.choice([p for p in world.people if p not in named]).name
    instruction = rng.choice(("List the names of the people mentioned in the text.",
                              "Which people are named in this passage? Give their names.",
                              "Extract the name of every person in the text."))
    return Example("information_extraction", instruction, context,
                   f"Names: {', '.join(names)}.", f"Names: {', '.join(wrong)}.")


_SUMMARY_INSTRUCTIONS = ("Summarize the text in one sentence.", "Give a one-sentence summary of this passage.",
                         "Sum up the paragraph below in a single sentence.")


def _summarize_person(world: World, rng: random.Random) -> Example:
    person = rng.choice(world.people)
    sentences = _bio(person, rng)
    for line in rng.sample(_DAILY_LIFE, 2):
        sentences.insert(rng.randint(1, len(sentences)), line.format(**person.facts()))
    wrong = _with_wrong_fact(world, rng, person, rng.choice(FIELDS))
    return Example("summarization", rng.choice(_SUMMARY_INSTRUCTIONS), " ".join(sentences),
                   _person_summary(person), _person_summary(wrong))


def _summarize_town(world: World, rng: random.Random) -> Example:
    town = rng.choice(world.towns)
    wrong = _with_wrong_town_fact(rng, town, rng.choice(("region", "river", "size", "trade", "founded")))
    return Example("summarization", rng.choice(_SUMMARY_INSTRUCTIONS), " ".join(_town_description(town, rng)),
                   _town_summary(town), _town_summary(wrong))


def _summarize_chronicle(world: World, rng: random.Random, min_chars: int) -> Example:
    """The shortest excerpt of a town's chronicle whose row reaches min_chars; entries are under 150 characters."""
    town = rng.choice(world.towns)
    intro = " ".join(_town_description(town, rng))
    instruction = f"Summarize this part of the chronicle of {town.name} in one sentence."
    wrong = _with_wrong_town_fact(rng, town, rng.choice(("region", "river", "size", "trade")))
    for count in range(1, CHRONICLE_LENGTH + 1):
        entries = town.chronicle[:count]
        example = Example("summarization", instruction, " ".join([intro, *(text for _, text in entries)]),
                          _chronicle_summary(town, entries), _chronicle_summary(wrong, entries))
        if _chars(example) >= min_chars:
            return example
    raise ValueError(f"no chronicle is long enough for {min_chars} characters")


def _food_fact(world: World, rng: random.Random) -> Fact:
    food = rng.choice(FOODS)
    ripeness = "ripe" if food in FRUIT_COLOURS else "fresh"
    colour = FOOD_COLOURS[food]
    return (f"What colour is a {ripeness} {food}?", f"A {ripeness} {food} is {colour}.",
            f"A {ripeness} {food} is {_other(rng, COLOURS, colour)}.")


_ANIMAL_FACTS = {  # attribute: (question, answer)
    "home": ("Where does {a} live?", "{A} lives in {value}."),
    "sound": ("What sound does {a} make?", "{A} {value}."),
    "food": ("What does {a} eat?", "{A} eats {value}."),
    "legs": ("How many legs does {a} have?", "{A} has {value} legs."),
    "colour": ("What colour is {a}?", "{A} is {value}."),
}


def _animal_value(animal: Animal, attribute: str) -> str:
    if attribute == "home":
        return _a(animal.home)
    return LEG_WORDS[animal.legs] if attribute == "legs" else getattr(animal, attribute)


def _animal_fact(world: World, rng: random.Random) -> Fact:
    name, attribute = rng.choice(ANIMAL_NAMES), rng.choice(tuple(_ANIMAL_FACTS))
    value = _animal_value(ANIMALS[name], attribute)
    wrong = _other(rng, sorted({_animal_value(animal, attribute) for animal in ANIMALS.values()}), value)
    question, answer = _ANIMAL_FACTS[attribute]
    names = {"a": _a(name), "A": _cap(_a(name))}
    return question.format(**names), answer.format(value=value, **names), answer.format(value=wrong, **names)


_TOWN_FACTS = {  # attribute: (question, answer)
    "river": ("Which river flows through {name}?", "The river {river} flows through {name}."),
    "region": ("In which part of the land is {name}?", "{name} is in {region}."),
    "trade": ("What work do most people in {name} do?", "Most people in {name} work in {trade}."),
}


def _town_fact(world: World, rng: random.Random) -> Fact:
    town, attribute = rng.choice(world.towns), rng.choice(tuple(_TOWN_FACTS))
    question, answer = _TOWN_FACTS[attribute]
    wrong = _with_wrong_town_fact(rng, town, attribute)
    return question.format(**town.facts()), answer.format(**town.facts()), answer.format(**wrong.facts())


def _open_qa(world: World, rng: random.Random) -> Example:
    """Two or three fact questions at once: many more distinct prompts than single facts, same answer rule."""
    facts: list[Fact] = []
    count = rng.choice((2, 2, 3))
    while len(facts) < count:
        fact = rng.choice((_food_fact, _animal_fact, _animal_fact, _town_fact))(world, rng)
        if fact[0] not in [known[0] for known in facts]:
            facts.append(fact)
    wrong_at = rng.randrange(count)
    instruction = rng.choice(("{q}", "Answer these questions: {q}", "Please answer briefly. {q}")).format(
        q=" ".join(fact[0] for fact in facts))
    return Example("open_qa", instruction, "", " ".join(fact[1] for fact in facts),
                   " ".join(fact[2] if i == wrong_at else fact[1] for i, fact in enumerate(facts)))


def _compare_two(rng: random.Random) -> Fact:
    a, b = rng.sample(range(1, 100), 2)
    big, small = max(a, b), min(a, b)
    if rng.random() < 0.5:
        question = rng.choice(("Which is larger, {a} or {b}?", "Which number is bigger, {a} or {b}?",
                               "Of the two numbers {a} and {b}, which one is larger?"))
        return question.format(a=a, b=b), f"{big} is larger than {small}.", f"{small} is larger than {big}."
    question = rng.choice(("Which is smaller, {a} or {b}?", "Which number is less, {a} or {b}?",
                           "Of the two numbers {a} and {b}, which one is smaller?"))
    return question.format(a=a, b=b), f"{small} is smaller than {big}.", f"{big} is smaller than {small}."


def _largest_of_three(rng: random.Random) -> Fact:
    numbers = rng.sample(range(1, 100), 3)
    listed = _and_list([str(n) for n in numbers])
    question = rng.choice(("Which is the largest of {l}?", "Find the largest number among {l}."))
    return (question.format(l=listed), f"{max(numbers)} is the largest of {listed}.",
            f"{_other(rng, numbers, max(numbers))} is the largest of {listed}.")


def _arithmetic(rng: random.Random) -> Fact:
    """A sum, difference or product; half the time the question also asks whether the result is even."""
    operation = rng.choice(("plus", "minus", "times"))
    if operation == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1 if operation == "minus" else 40)
    result = {"plus": a + b, "minus": a - b, "times": a * b}[operation]
    wrong = _near_miss(rng, result, 3)
    question = rng.choice(("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Work out {a} {op} {b}.")).format(
        a=a, op=operation, b=b)
    if rng.random() < 0.5:
        return question, f"{a} {operation} {b} is {result}.", f"{a} {operation} {b} is {wrong}."
    return (f"{question} Is the result even or odd?", f"{a} {operation} {b} is {result}, and {result} is "
            f"{_parity(str(result))}.", f"{a} {operation} {b} is {wrong}, and {wrong} is {_parity(str(wrong))}.")


def _successor(rng: random.Random) -> Fact:
    n = rng.randint(1, 300)
    question = rng.choice(("What number comes after {n}?", "Which number follows {n} when you count up?",
                           "Count on by one: what comes after {n}?"))
    return question.format(n=n), f"{n + 1} comes after {n}.", f"{_near_miss(rng, n + 1, 2)} comes after {n}."


def _general_qa(world: World, rng: random.Random) -> Example:
    question, answer, wrong = rng.choice((_compare_two, _largest_of_three, _arithmetic, _arithmetic, _successor))(rng)
    return Example("general_qa", question, "", answer, wrong)


def _object_uses(world: World, rng: random.Random) -> Example:
    objects = rng.sample(OBJECT_NAMES, rng.choice((1, 2, 2, 3)))
    if len(objects) == 1:
        prompts = ("List three things you can do with {0}.", "Name three uses for {0}.",
                   "What are three ways to use {0}?")
    else:
        prompts = ("List three uses each for {0}.", "Name three things you can do with each of these: {0}.",
                   "What can you do with {0}? Give three uses for each.")
    instruction = rng.choice(prompts).format(_and_list([_a(obj) for obj in objects]))
    wrong_at = rng.randrange(len(objects))
    wrong_uses = [OBJECT_USES[_other(rng, OBJECT_NAMES, obj) if i == wrong_at else obj]
                  for i, obj in enumerate(objects)]
    return Example("brainstorming", instruction, "", " ".join(_uses(obj, OBJECT_USES[obj]) for obj in objects),
                   " ".join(_uses(obj, uses) for obj, uses in zip(objects, wrong_uses)))


def _needs(people: Sequence[Person], jobs: Sequence[str]) -> str:
    return " ".join(f"{person.name} needs {_and_list(JOB_TOOLS[job])}." for person, job in zip(people, jobs))


def _job_tools(world: World, rng: random.Random) -> Example:
    people = rng.sample(world.people, rng.choice((1, 2, 2)))
    verb = rng.choice(("works as", "is"))
    who = people[0].first if len(people) == 1 else "each of them"
    ask = rng.choice((f"Name three things {who} needs for work.", f"Suggest three things {who} needs for the job."))
    jobs = [person.job for person in people]
    wrong_at = rng.randrange(len(people))
    wrong_jobs = [_other(rng, tuple(JOB_TOOLS), job) if i == wrong_at else job for i, job in enumerate(jobs)]
    intro = " ".join(f"{person.name} {verb} {_a(person.job)}." for person in people)
    return Example("brainstorming", f"{intro} {ask}", "", _needs(people, jobs), _needs(people, wrong_jobs))


def _town_visit(world: World, rng: random.Random) -> Example:
    person, town = rng.choice(world.people), rng.choice(world.towns)
    instruction = rng.choice(("{who} is spending a day in {name}. Suggest three things to do there.",
                              "Give {who} three ideas for a day out in {name}.")).format(
        who=person.name, name=town.name)
    wrong = _with_wrong_town_fact(rng, town, rng.choice(("river", "trade")))
    return Example("brainstorming", instruction, "", _visit(person.name, town), _visit(person.name, wrong))


_CLASSIFICATIONS: tuple[tuple[Sequence[str], Callable[[str], str], tuple[str, ...]], ...] = (
    (FOODS, _food_class, ("Classify each item as a fruit or a vegetable: {items}.",
                          "Sort these foods into fruits and vegetables: {items}.",
                          "Which of these are fruits and which are vegetables? {items}.")),
    (tuple(str(n) for n in range(1, 100)), _parity, ("Classify each number as even or odd: {items}.",
                                                     "Label each of these numbers even or odd: {items}.",
                                                     "Say whether each number is even or odd: {items}.")),
    (ANIMAL_NAMES, _animal_class, ("Classify each animal as a farm animal or a wild animal: {items}.",
                                   "Which of these animals live on a farm and which are wild? {items}.",
                                   "Sort these animals into farm animals and wild animals: {items}.")),
)


def _classification(world: World, rng: random.Random) -> Example:
    pool, label_of, prompts = rng.choice(_CLASSIFICATIONS)
    items = rng.sample(pool, rng.randint(3, 5))
    labels = [label_of(item) for item in items]
    wrong = list(labels)
    flip = rng.randrange(len(items))
    wrong[flip] = _other(rng, sorted({label_of(item) for item in pool}), labels[flip])
    return Example("classification", rng.choice(prompts).format(items=", ".join(items)), "",
                   _labelled(items, labels), _labelled(items, wrong))


def _animal_poem(world: World, rng: random.Random) -> Example:
    name, colour, time = rng.choice(ANIMAL_NAMES), rng.choice(COLOURS), rng.choice(TIMES_OF_DAY)
    animal = ANIMALS[name]
    instruction = rng.choice(("Write a two-line poem about {a} at {time}.",
                              "Compose a short poem of two lines about {a} at {time}.",
                              "Write a little rhyme in two lines about {a} at {time}.")).format(
        a=f"{_a(colour)} {name}", time=time)
    field = rng.choice(("home", "food"))
    values = sorted({getattr(other, field) for other in ANIMALS.values()})
    wrong = replace(animal, **{field: _other(rng, values, getattr(animal, field))})
    return Example("creative_writing", instruction, "", _poem(colour, name, animal, time),
                   _poem(colour, name, wrong, time))


def _person_story(world: World, rng: random.Random) -> Example:
    person, weather, season = rng.choice(world.people), rng.choice(WEATHERS), rng.choice(SEASONS)
    instruction = rng.choice(("Write a three-sentence story about {name}, {a_job} from {town} who keeps {a_pet}. "
                              "Set it on a {weather} {season} morning.",
                              "Tell a short story in three sentences about {name}, {a_job} from {town} "
                              "who keeps {a_pet}, on a {weather} {season} morning.")).format(
        weather=weather, season=season, **person.facts())
    wrong = _with_wrong_fact(world, rng, person, rng.choice(("job", "pet")))
    return Example("creative_writing", instruction, "", _story(person, weather, season),
                   _story(wrong, weather, season))


_TASKS: dict[str, tuple[Task, ...]] = {
    "open_qa": (_open_qa,),
    "closed_qa": (_closed_qa,),
    "information_extraction": (_extract_fields, _extract_fields, _extract_names),
    "summarization": (_summarize_person, _summarize_town),
    "brainstorming": (_object_uses, _object_uses, _job_tools, _town_visit),
    "classification": (_classification,),
    "general_qa": (_general_qa,),
    "creative_writing": (_animal_poem, _person_story),
}


def _example(category: str, world: World, rng: random.Random) -> Example:
    return rng.choice(_TASKS[category])(world, rng)


def _prompt(example: Example) -> str:
    return f"{example.instruction}\n\n{example.context}" if example.context else example.instruction


def _fresh_example(category: str, world: World, rng: random.Random, seen: set[str]) -> Example:
    """An example whose prompt is not in `seen` (so no test prompt repeats a train prompt), if one turns up soon."""
    for _ in range(50):
        example = _example(category, world, rng)
        if _prompt(example) not in seen:
            break
    seen.add(_prompt(example))
    return example


def _chars(example: Example) -> int:
    return len(example.instruction) + len(example.context) + len(example.response)


# ---------------------------------------------------------------------------------------------------------------
# Dolly rows

_INVALID_DOLLY_KINDS = ("duplicate", "missing_field", "empty_text", "wrong_type")


def _special_counts(n_rows: int) -> tuple[int, int, int]:
    """How many too-long, near-limit and invalid rows a set of n_rows gets."""
    if n_rows < MIN_ROWS_FOR_SPECIALS:
        return 0, 0, 0
    return max(3, n_rows // 100), max(2, n_rows // 200), max(4, n_rows // 100)


def _dolly_row(example: Example) -> dict:
    return {"instruction": example.instruction, "context": example.context, "response": example.response,
            "category": example.category}


def _broken_dolly_row(row: dict, kind: str, rng: random.Random) -> dict:
    if kind == "missing_field":
        del row[rng.choice(("instruction", "response"))]
    elif kind == "empty_text":
        row.update(rng.choice(({"instruction": ""}, {"response": "  \n"})))
    else:
        row["response"] = rng.choice((len(row["response"]), [row["response"]]))
    return row


def make_dolly_rows(seed: int, n_rows: int) -> list[dict]:
    """Rows in the databricks-dolly-15k schema: keys exactly instruction, context, response, category
    (all str; context "" when the task has none).

    Fewer than MIN_ROWS_FOR_SPECIALS rows are all valid and normal. Larger sets also hold about 1% (at least 3) rows
    of LONG_ROW_CHARS or more, at least 2 just under that limit, and about 1% (at least 4) invalid rows: a missing
    field, an empty text, a wrong type, and an exact copy of an earlier row.
    """
    world, rng = _world(seed), random.Random(seed)
    n_long, n_near, n_invalid = _special_counts(n_rows)
    seen: set[str] = set()
    rows = [_dolly_row(_fresh_example(DOLLY_CATEGORIES[i % len(DOLLY_CATEGORIES)], world, rng, seen))
            for i in range(n_rows - n_long - n_near - n_invalid)]
    rows += [_dolly_row(_summarize_chronicle(world, rng, rng.randint(LONG_ROW_CHARS, LONG_ROW_CHARS + 900)))
             for _ in range(n_long)]
    rows += [_dolly_row(_summarize_chronicle(world, rng, NEAR_LIMIT_CHARS)) for _ in range(n_near)]
    rng.shuffle(rows)
    kinds = [_INVALID_DOLLY_KINDS[i % len(_INVALID_DOLLY_KINDS)] for i in range(n_invalid)]
    for _ in range(kinds.count("duplicate")):  # before the broken rows, so every candidate original is valid
        originals = [i for i, row in enumerate(rows) if len("".join(row.values())) <= NORMAL_MAX_CHARS]
        original = rng.choice(originals)
        rows.insert(rng.randint(original + 1, len(rows)), dict(rows[original]))
    for kind in kinds:
        if kind != "duplicate":
            broken = _broken_dolly_row(_dolly_row(_example(rng.choice(DOLLY_CATEGORIES), world, rng)), kind, rng)
            rows.insert(rng.randint(0, len(rows)), broken)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# UltraFeedback pairs

_INVALID_PREFERENCE_KINDS = ("missing_rejected", "chosen_not_a_list", "empty_assistant")
_CHOSEN_SCORES = (8.0, 8.5, 9.0, 9.5, 10.0)
_REJECTED_SCORES = {"wrong_fact": (1.0, 2.0, 3.0), "off_format": (2.0, 3.0, 4.0), "verbose": (4.0, 5.0, 6.0)}
_PADDING = (
    ("Thank you for the question, I am glad to help with it.", "Let me think about this with care before I answer.",
     "That is a good thing to ask, so I will explain it slowly."),
    ("To say it again in other words:", "So, once more, to be very clear:", "In short, and to repeat the main point:"),
    ("I hope this helps, and please ask again if you want to know more.",
     "There is not much more to say, but I wanted to be complete."),
)


def _verbose(answer: str, rng: random.Random) -> str:
    """The right answer, said twice between filler."""
    opener, bridge, closer = (rng.choice(options) for options in _PADDING)
    parts = [opener, answer, bridge, answer]
    return " ".join(parts if len(" ".join(parts)) >= 3 * len(answer) else [*parts, closer])


def _off_format(example: Example, world: World, rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:  # talks about the question instead of answering it
        return (f"You asked: {example.instruction} That is the question. Many people ask this question, "
                f"and it is a good question to ask. The question was: {example.instruction}")
    if style == 1:  # the right words, without capitals or punctuation
        return re.sub(r"[^\w\s]", "", example.response).lower()
    if style == 2:  # trails off before the answer
        words = example.response.split()
        return " ".join(words[: max(1, len(words) // 3)]) + " ..."
    return _example(_other(rng, DOLLY_CATEGORIES, example.category), world, rng).response  # answers another task


def _rejected(example: Example, kind: str, world: World, rng: random.Random) -> str:
    if kind == "wrong_fact":
        return example.wrong
    return _verbose(example.response, rng) if kind == "verbose" else _off_format(example, world, rng)


def _preference_row(example: Example, rejected: str, kind: str, rng: random.Random) -> dict:
    prompt = _prompt(example)

    def conversation(answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            "chosen": conversation(example.response), "rejected": conversation(rejected),
            "messages": conversation(example.response), "score_chosen": rng.choice(_CHOSEN_SCORES),
            "score_rejected": rng.choice(_REJECTED_SCORES[kind]), "category": example.category}


def _broken_preference_row(row: dict, kind: str) -> dict:
    if kind == "missing_rejected":
        del row["rejected"]
    elif kind == "chosen_not_a_list":
        row["chosen"] = row["chosen"][1]["content"]
    else:
        row["chosen"][1]["content"] = row["messages"][1]["content"] = ""
    return row


def _labelled_preference_rows(seed: int, n_rows: int) -> list[tuple[dict, str]]:
    """make_ultrafeedback_rows's rows, each with its rejected kind, or its invalid kind for a broken row."""
    world = _world(seed)
    rng = random.Random(seed + 1_000_003)  # another stream than the Dolly rows', so the prompts overlap little
    n_invalid = 0 if n_rows < MIN_ROWS_FOR_SPECIALS else max(3, n_rows // 100)
    seen: set[str] = set()
    labelled = []
    for i in range(n_rows - n_invalid):
        example = _fresh_example(DOLLY_CATEGORIES[i % len(DOLLY_CATEGORIES)], world, rng, seen)
        kind = REJECTED_KINDS[i % len(REJECTED_KINDS)]
        labelled.append((_preference_row(example, _rejected(example, kind, world, rng), kind, rng), kind))
    for i in range(n_invalid):
        example = _example(rng.choice(DOLLY_CATEGORIES), world, rng)
        kind = _INVALID_PREFERENCE_KINDS[i % len(_INVALID_PREFERENCE_KINDS)]
        row = _preference_row(example, example.wrong, "wrong_fact", rng)
        labelled.append((_broken_preference_row(row, kind), kind))
    rng.shuffle(labelled)
    return labelled


def make_ultrafeedback_rows(seed: int, n_rows: int) -> list[dict]:
    """Rows in the HuggingFaceH4/ultrafeedback_binarized schema: prompt (str), prompt_id (64-hex sha256 of the prompt),
    chosen and rejected (lists of {"role","content"}: a user turn equal to prompt then one assistant turn),
    messages (same as chosen), score_chosen, score_rejected (floats, chosen > rejected), plus an extra key
    category (one of DOLLY_CATEGORIES) that the real dataset lacks but our loader uses when present."""
    return [row for row, _ in _labelled_preference_rows(seed, n_rows)]


# ---------------------------------------------------------------------------------------------------------------
# Pre-training prose


def _person_paragraphs(person: Person, rng: random.Random) -> list[str]:
    facts = person.facts()
    daily = [line.format(**facts) for line in rng.sample(_DAILY_LIFE, 2)]
    tools = f"As {facts['a_job']}, {person.first} needs {_and_list(JOB_TOOLS[person.job])}."
    story = _story(person, rng.choice(WEATHERS), rng.choice(SEASONS))
    return [" ".join([*_bio(person, rng), *daily]), f"{_person_summary(person)} {story} {tools}",
            " ".join(_bio(person, rng))]


def _town_paragraphs(world: World, town: Town, rng: random.Random) -> list[str]:
    names = _and_list([person.name for person in world.residents(town)])
    paragraphs = [" ".join(_town_description(town, rng)),
                  f"The names of some people who live in {town.name} are {names}. {_visit('visitors', town)}"]
    for start in range(0, CHRONICLE_LENGTH, 10):
        entries = town.chronicle[start:start + 10]
        paragraphs.append(f"This part of the chronicle of {town.name} records these events. "
                          + " ".join(text for _, text in entries) + " " + _chronicle_summary(town, entries))
    return paragraphs


def _lexicon_paragraphs(rng: random.Random) -> list[str]:
    paragraphs = []
    for name, animal in ANIMALS.items():
        a = _cap(_a(name))
        paragraphs.append(f"{a} is {animal.colour}. {a} lives in {_a(animal.home)} and eats {animal.food}. "
                          f"{a} {animal.sound}. {a} has {LEG_WORDS[animal.legs]} legs. "
                          f"{a} is {_a(_animal_class(name))}.")
        paragraphs += [_poem(colour, name, animal, time) for colour, time in zip(rng.sample(COLOURS, 4), TIMES_OF_DAY)]
    foods = [f"{_cap(_a(food))} is {_a(_food_class(food))}. A {'ripe' if food in FRUIT_COLOURS else 'fresh'} "
             f"{food} is {FOOD_COLOURS[food]}." for food in rng.sample(FOODS, len(FOODS))]
    paragraphs += [" ".join(foods[i:i + 4]) for i in range(0, len(foods), 4)]
    paragraphs += [f"{_uses(obj, uses)} People keep {_a(obj)} at home." for obj, uses in OBJECT_USES.items()]
    paragraphs += [f"{_cap(_a(job))} needs {_and_list(tools)}." for job, tools in JOB_TOOLS.items()]
    return paragraphs


def _number_paragraphs(rng: random.Random, count: int = 80) -> list[str]:
    statements = (_compare_two, _largest_of_three, _arithmetic, _arithmetic, _successor)
    return [" ".join(rng.choice(statements)(rng)[1] for _ in range(8)) for _ in range(count)]


def make_pretraining_text(seed: int) -> list[str]:
    """Plain-text paragraphs describing the world (no instructions, no [INST], no question/answer format), used to
    pre-train the tiny base model so it 'writes the language' of this world. A few hundred KB at most."""
    world = _world(seed)
    rng = random.Random(seed + 2_000_003)
    paragraphs = [text for person in world.people for text in _person_paragraphs(person, rng)]
    paragraphs += [text for town in world.towns for text in _town_paragraphs(world, town, rng)]
    paragraphs += _lexicon_paragraphs(rng) + _number_paragraphs(rng)
    rng.shuffle(paragraphs)
    return paragraphs
