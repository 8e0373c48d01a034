"""Offline training prompts for `wisp-distill`: templates filled from word lists, no download.

They span what chat users ask (writing, role-play, reasoning, arithmetic,
code, extraction, science, humanities, everyday advice) so that the
target's answers to them look like its answers to real requests. None is
taken from an evaluation set; `wisp-distill` also drops any prompt that
shares a long word sequence with a file given as ``--exclude``.
"""

from __future__ import annotations

import random
import re


def _words(text: str) -> tuple[str, ...]:
    """A word list written as one block of text, items separated by semicolons."""
    return tuple(" ".join(item.split()) for item in text.split(";"))


TOPICS = _words(
    """
    photosynthesis; black holes; the water cycle; plate tectonics; vaccines; climate change; the immune system;
    electric cars; renewable energy; the stock market; inflation; supply and demand; machine learning; the internet;
    blockchain; quantum computers; DNA; evolution; volcanoes; earthquakes; the moon landing; the printing press; the
    Roman Empire; the French Revolution; the Industrial Revolution; ancient Egypt; the Renaissance; democracy; human
    rights; coral reefs; rainforests; bees; sleep; meditation; nutrition; exercise; friendship; leadership;
    teamwork; public speaking; time management; remote work; social media; video games; chess; jazz music;
    impressionist painting; poetry; the Olympic Games; space exploration; Mars; the solar system; gravity;
    magnetism; electricity; sound waves; light; rainbows; the seasons; tides; weather; hurricanes; recycling;
    plastic pollution; urban gardening; coffee; tea; chocolate; bread baking; cheese making; the human heart; the
    brain; memory; language learning; mathematics; prime numbers; probability; statistics; cryptography; computer
    viruses; passwords; databases; cloud computing; robots; self-driving cars; 3D printing; smartphones; batteries;
    solar panels; wind turbines; nuclear power; antibiotics; the placebo effect; genetics; cells; bacteria; fungi;
    dinosaurs; penguins; whales; elephants; migration of birds; libraries; museums; architecture; bridges;
    skyscrapers; trains; airplanes; sailing; mountain climbing; camping; gardening; photography; film making;
    theatre; opera; folk tales; mythology; philosophy; ethics; happiness; habits; motivation; creativity; curiosity;
    kindness; volunteering; budgeting; saving money; taxes; entrepreneurship; marketing; customer service;
    negotiation; job interviews; resumes; email etiquette
    """
)
AUDIENCES = _words(
    """
    a ten-year-old; a high school student; a busy parent; a retired teacher; a software engineer; a first-year
    university student; someone who has never heard of it; a curious grandparent; a tourist; a small business owner;
    a nurse; a farmer; an artist
    """
)
FORMS = _words(
    """
    short poem; haiku; limerick; four-line rhyme; short story opening; blog post introduction; product description;
    persuasive paragraph; thank-you note; motivational message; news headline and lead; diary entry; dialogue
    between two friends; speech opening; song chorus; fable with a moral; letter to a pen pal; travel postcard;
    advertisement slogan and tagline; short mystery scene
    """
)
PERSONAS = _words(
    """
    a pirate captain; a medieval knight; a friendly tour guide; a personal fitness coach; a famous chef; a detective
    in 1920s London; an astronaut on the space station; a wise old librarian; a museum curator; a park ranger; a
    travel agent; a kindergarten teacher; a sports commentator; a robot from the future; a dragon who loves books; a
    barista; a ship's navigator; a time traveler from ancient Rome
    """
)
GOALS = _words(
    """
    sleep better; stay focused while studying; save money each month; learn a new language; eat healthier; start
    running; reduce stress; make new friends in a new city; write more clearly; keep a clean home; prepare for a job
    interview; start a small garden; read more books; be more productive at work; plan a birthday party; travel on a
    budget; improve my handwriting; get better at chess; learn to cook; organize my week; stay motivated to
    exercise; give a good presentation
    """
)
LANGUAGES = ("Python", "JavaScript", "Java", "C", "Go", "Rust", "SQL", "Bash")
CODE_TASKS = _words(
    """
    reverses a string; checks whether a number is prime; returns the largest element of a list; counts the vowels in
    a sentence; computes the factorial of n; merges two sorted lists; removes duplicates from a list while keeping
    the order; converts Celsius to Fahrenheit; checks whether a word is a palindrome; returns the n-th Fibonacci
    number; sums the digits of an integer; finds the most common word in a text; flattens a nested list; validates
    an email address; sorts a list of names alphabetically; computes the average of a list of numbers; reads a file
    and counts its lines; capitalizes the first letter of every word; finds the second largest number; checks
    whether two strings are anagrams; converts a binary string to an integer; rotates a list by k places
    """
)
THINGS = _words(
    """
    living in a big city; working from home; owning a dog; online learning; electric bikes; public transport;
    nuclear energy; social media for teenagers; a four-day work week; self-checkout machines; buying a house;
    renting an apartment; studying abroad; homeschooling; using a smartwatch; vegetarian diets; fast fashion;
    e-books; video calls; camping holidays
    """
)
PAIRS = tuple(
    tuple(pair.split(" / "))
    for pair in _words(
        """
        a virus / a bacterium; weather / climate; a comet / an asteroid; speed / velocity; a lake / a pond; an alligator
        / a crocodile; baking soda / baking powder; RAM / storage; a democracy / a monarchy; a simile / a metaphor; mass
        / weight; a turtle / a tortoise; HTTP / HTTPS; a list / a tuple in Python; an ocean / a sea; stocks / bonds; a
        frog / a toad; a meteor / a meteorite; a psychologist / a psychiatrist; a diet / a fast
        """
    )
)
EVENTS = _words(
    """
    World War I; the fall of the Berlin Wall; the invention of the telephone; the first moon landing; the discovery
    of penicillin; the building of the pyramids; the signing of the Magna Carta; the invention of the airplane; the
    end of the Cold War; the Age of Exploration; the Gold Rush; the rise of the internet; the invention of writing;
    the abolition of slavery; the first Olympic Games
    """
)
THINKERS = _words(
    """
    Socrates; Confucius; Aristotle; Marie Curie; Isaac Newton; Charles Darwin; Ada Lovelace; Leonardo da Vinci;
    Albert Einstein; Simone de Beauvoir; Adam Smith; Galileo Galilei; Florence Nightingale
    """
)
NAMES = ("Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Keiko", "Liam", "Maya")
ITEMS = ("apples", "notebooks", "pencils", "tickets", "cupcakes", "bottles of water", "books", "stamps", "oranges")
CITIES = ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Toronto", "Sydney", "Mumbai", "Rome", "Seoul")


def _fill(rng: random.Random) -> str:
    n, m, k = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
    a, b = rng.sample(NAMES, 2)
    pair = rng.choice(PAIRS)
    templates = (
        lambda: f"Explain {rng.choice(TOPICS)} to {rng.choice(AUDIENCES)}.",
        lambda: f"Write a {rng.choice(FORMS)} about {rng.choice(TOPICS)}.",
        lambda: f"Pretend you are {rng.choice(PERSONAS)}. Describe your typical day.",
        lambda: f"You are {rng.choice(PERSONAS)}. Give me advice on how to {rng.choice(GOALS)}.",
        lambda: f"Give me {k} tips to {rng.choice(GOALS)}.",
        lambda: f"How can I {rng.choice(GOALS)}?",
        lambda: f"What are the pros and cons of {rng.choice(THINGS)}?",
        lambda: f"What is the difference between {pair[0]} and {pair[1]}?",
        lambda: f"Write a {rng.choice(LANGUAGES)} function that {rng.choice(CODE_TASKS)}.",
        lambda: f"How would you write a program in {rng.choice(LANGUAGES)} that {rng.choice(CODE_TASKS)}? Explain it.",
        lambda: f"What were the main causes and consequences of {rng.choice(EVENTS)}?",
        lambda: f"Summarize the main ideas of {rng.choice(THINKERS)} in a short paragraph.",
        lambda: f"Why is {rng.choice(TOPICS)} important? Answer in three sentences.",
        lambda: f"List five interesting facts about {rng.choice(TOPICS)}.",
        lambda: f"{a} has {n} {rng.choice(ITEMS)} and gives {min(n - 1, m)} to {b}. How many are left? Explain.",
        lambda: f"What is {n} times {m}, plus {k}? Show your steps.",
        lambda: f"A train travels {n * 10} km in {k} hours. What is its average speed?",
        lambda: f"Solve for x: {k}x + {n} = {k * m + n}.",
        lambda: f"What is {n}% of {m * 20}?",
        lambda: f"{a} is older than {b}, and {b} is older than Sam. Who is the youngest, and why?",
        lambda: f"If it takes {k} people {n} hours to paint a house, how long would {k * 2} people take?",
        lambda: (
            f"Extract the names, places and dates from this text: {a} flew from {rng.choice(CITIES)} to "
            f"{rng.choice(CITIES)} on March {n}, 20{m:02d}, to meet {b}."
        ),
        lambda: f"Plan a {k}-day trip to {rng.choice(CITIES)} for {rng.choice(AUDIENCES)}.",
        lambda: f"Write an email to my manager asking for a day off to {rng.choice(GOALS)}.",
        lambda: f"Describe how {rng.choice(TOPICS)} works, step by step.",
        lambda: f"Compare {rng.choice(TOPICS)} and {rng.choice(TOPICS)}.",
        lambda: f"What would happen if there were no {rng.choice(TOPICS)}?",
        lambda: f"Tell me a short story for children about {rng.choice(TOPICS)}.",
        lambda: f"What questions should I ask before {rng.choice(THINGS)}?",
        lambda: f"Give a short history of {rng.choice(TOPICS)}.",
        lambda: f"What can {rng.choice(AUDIENCES)} learn from {rng.choice(THINKERS)}?",
        lambda: f"Suggest a name and a slogan for a shop that sells {rng.choice(ITEMS)}.",
        lambda: (
            f"Write a recipe idea that uses {rng.choice(ITEMS)} and {rng.choice(('rice', 'eggs', 'pasta', 'beans'))}."
        ),
        lambda: f"What are common mistakes people make when they try to {rng.choice(GOALS)}?",
        lambda: f"Rewrite this sentence to sound more formal: '{a} wanna know if {b} can come over tonight.'",
        lambda: (
            f"Translate 'good morning, how are you?' into {rng.choice(('French', 'Spanish', 'German', 'Italian'))}."
        ),
        lambda: (
            f"Explain what a {rng.choice(('loop', 'function', 'variable', 'class', 'recursion', 'API'))} "
            "is in programming."
        ),
    )
    return rng.choice(templates)()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def training_prompts(count: int, seed: int = 0, exclude: list[str] = (), ngram: int = 8) -> list[str]:
    """``count`` distinct prompts; none shares an ``ngram``-word sequence with any text in ``exclude``."""
    banned = set().union(*(word_ngrams(text, ngram) for text in exclude)) if exclude else set()
    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    for _ in range(count * 50):
        prompt = _fill(rng)
        if prompt not in prompts and not word_ngrams(prompt, ngram) & banned:
            prompts[prompt] = None
            if len(prompts) == count:
                break
    return list(prompts)
