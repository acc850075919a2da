"""tasks/knowledge.py: the built-in "knowledge" task: questions about the facts of Nimbus (the company of the
triage task), answered in one sentence. Generator and scorer together.

The facts live in a small document store, one short document per topic (a product, a plan, a policy, the
people, the stores). Version 1 is what the fine-tuning data teaches; in version 2 about a third of the facts
change (new prices, new hours, a renamed product), as a real store does. Each fact is asked in five
paraphrases: train and val use the first three, test the last two, so a test question is never a training
question. The scorer reads a reply as right if it states the current value, stale if it states the old one
instead: the measure of "fine-tuning changes how the model behaves; retrieval changes what it knows".

Splits: train, val, test (version-1 questions), test_v2 (version-2 questions), docs_v1, docs_v2 (the store).

    python data.py --generate      # rewrites data/knowledge/*.jsonl from build_knowledge() (seed 0)
"""

import random
import re

KNOWLEDGE_SYSTEM = "Answer the question about Nimbus in one sentence."

# Questions by kind of fact: {e} is the entity. The first three phrasings train, the last two test.
QUESTIONS = {
    "price": ("How much does the {e} cost?", "What is the price of the {e}?", "What does the {e} sell for?",
              "How much would I pay for the {e}?", "What's the {e} priced at?"),
    "monthly": ("How much is the {e} per month?", "What does the {e} cost each month?",
                "What is the monthly price of the {e}?", "How much will the {e} cost me a month?",
                "What's the monthly fee for the {e}?"),
    "warranty": ("How long is the warranty on the {e}?", "What warranty comes with the {e}?",
                 "How many years of warranty does the {e} have?", "For how long is the {e} under warranty?",
                 "What's the warranty period of the {e}?"),
    "spec": ("What is the {e}?", "Tell me the {e}.", "What's the {e}?", "Do you know the {e}?",
             "Can you tell me the {e}?"),
    "who": ("Who is the {e} at Nimbus?", "Who is Nimbus's {e}?", "Who works as {e} at Nimbus?",
            "Which person is the {e} at Nimbus?", "Who holds the role of {e} at Nimbus?"),
    "policy": ("What is the {e}?", "Tell me the {e}.", "Please tell me the {e}.", "Could you tell me the {e}?",
               "I'd like to know the {e}."),
}

# (topic, kind, entity as asked, answer sentence with {v}, value in version 1, value in version 2 or None)
FACTS = [
    ("Thermo X2 thermostat", "price", "Thermo X2", "The Thermo X2 costs {v}.", "$129", "$149"),
    ("Thermo X2 thermostat", "warranty", "Thermo X2", "The Thermo X2 has a {v} warranty.", "2-year", None),
    ("Thermo X2 thermostat", "spec", "screen size of the Thermo X2", "The Thermo X2 has a {v} screen.", "3.5-inch", None),
    ("Thermo X2 thermostat", "spec", "battery backup of the Thermo X2", "The Thermo X2's battery backup lasts {v}.",
     "12 hours", "24 hours"),
    ("Thermo X2 thermostat", "spec", "launch year of the Thermo X2", "The Thermo X2 launched in {v}.", "2022", None),
    ("Nimbus Buds earbuds", "price", "Nimbus Buds", "The Nimbus Buds cost {v}.", "$59", "$49"),
    ("Nimbus Buds earbuds", "warranty", "Nimbus Buds", "The Nimbus Buds have a {v} warranty.", "1-year", None),
    ("Nimbus Buds earbuds", "spec", "battery life of the Nimbus Buds", "The Nimbus Buds play for {v} on a charge.",
     "6 hours", None),
    ("Nimbus Buds earbuds", "spec", "number of colours of the Nimbus Buds", "The Nimbus Buds come in {v}.",
     "4 colours", "6 colours"),
    ("Buds Pro earbuds", "price", "Buds Pro", "The Buds Pro cost {v}.", "$149", None),
    ("Buds Pro earbuds", "warranty", "Buds Pro", "The Buds Pro have a {v} warranty.", "2-year", None),
    ("Buds Pro earbuds", "spec", "battery life of the Buds Pro", "The Buds Pro play for {v} on a charge.",
     "9 hours", "11 hours"),
    ("Buds Pro earbuds", "spec", "noise cancelling level of the Buds Pro", "The Buds Pro cancel up to {v} of noise.",
     "35 dB", None),
    ("Buds Pro earbuds", "spec", "name of Nimbus's flagship earbuds", "Nimbus's flagship earbuds are called the {v}.",
     "Buds Pro", "Buds Ultra"),
    ("Mesh Router M3", "price", "Mesh Router M3", "The Mesh Router M3 costs {v}.", "$199", "$179"),
    ("Mesh Router M3", "warranty", "Mesh Router M3", "The Mesh Router M3 has a {v} warranty.", "3-year", None),
    ("Mesh Router M3", "spec", "coverage of the Mesh Router M3", "One Mesh Router M3 covers {v}.", "2,500 sq ft", None),
    ("Mesh Router M3", "spec", "top speed of the Mesh Router M3", "The Mesh Router M3 reaches {v}.", "3.6 Gbps", None),
    ("Mesh Router M3", "spec", "device limit of the Mesh Router M3", "The Mesh Router M3 connects up to {v}.",
     "150 devices", "200 devices"),
    ("Basic plan", "monthly", "Basic plan", "The Basic plan costs {v} a month.", "$3", None),
    ("Basic plan", "spec", "history kept by the Basic plan", "The Basic plan keeps {v} of history.", "7 days", None),
    ("Premium plan", "monthly", "Premium plan", "The Premium plan costs {v} a month.", "$8", "$10"),
    ("Premium plan", "spec", "history kept by the Premium plan", "The Premium plan keeps {v} of history.", "90 days",
     None),
    ("Premium plan", "spec", "device limit of the Premium plan", "The Premium plan covers up to {v}.", "10 devices",
     None),
    ("Business plan", "monthly", "Business plan", "The Business plan costs {v} a month.", "$25", None),
    ("Business plan", "spec", "history kept by the Business plan", "The Business plan keeps {v} of history.",
     "1 year", "2 years"),
    ("Business plan", "spec", "seat limit of the Business plan", "The Business plan allows up to {v}.", "50 seats",
     None),
    ("Returns and refunds", "policy", "return window", "Nimbus accepts returns within {v} of delivery.", "30 days",
     "45 days"),
    ("Returns and refunds", "policy", "refund processing time", "Refunds are processed within {v}.",
     "5 business days", None),
    ("Returns and refunds", "policy", "restocking fee for opened items", "Opened items carry a {v} restocking fee.",
     "10%", "0%"),
    ("Returns and refunds", "policy", "price-match window", "Nimbus matches a lower price within {v} of purchase.",
     "14 days", None),
    ("Shipping", "policy", "free shipping threshold", "Shipping is free on orders over {v}.", "$50", "$35"),
    ("Shipping", "policy", "express shipping price", "Express shipping costs {v}.", "$15", None),
    ("Shipping", "policy", "standard delivery time", "Standard delivery takes {v}.", "3 to 5 business days", None),
    ("Shipping", "policy", "number of countries Nimbus ships to", "Nimbus ships to {v}.", "28 countries",
     "34 countries"),
    ("Discounts", "policy", "student discount", "Students get a {v} discount.", "15%", None),
    ("Discounts", "policy", "trade-in credit for an old router", "An old router earns {v} of trade-in credit.",
     "$40", "$60"),
    ("Discounts", "policy", "loyalty points per dollar", "Members earn {v} per dollar spent.", "2 points", None),
    ("Support", "policy", "phone support hours on weekdays", "Phone support is open {v} on weekdays.",
     "8 am to 8 pm", "7 am to 9 pm"),
    ("Support", "policy", "phone support hours on Saturdays", "Phone support is open {v} on Saturdays.",
     "9 am to 5 pm", None),
    ("Support", "policy", "support email address", "Support answers at {v}.", "help@nimbus.example", None),
    ("Support", "policy", "support phone number", "Support's phone number is {v}.", "555-0142", None),
    ("Support", "policy", "live chat hours", "Live chat is open {v}.", "24 hours a day", None),
    ("Support", "policy", "average email response time", "Support answers emails within {v} on average.",
     "6 hours", "2 hours"),
    ("Company", "who", "chief executive", "Nimbus's chief executive is {v}.", "Maya Lindqvist", None),
    ("Company", "who", "chief technology officer", "Nimbus's chief technology officer is {v}.",
     "Tomas Okafor", "Priya Raman"),
    ("Company", "who", "head of support", "Nimbus's head of support is {v}.", "Kenji Sato", None),
    ("Company", "who", "head of design", "Nimbus's head of design is {v}.", "Lucia Ferreira", None),
    ("Company", "policy", "founding year of Nimbus", "Nimbus was founded in {v}.", "2014", None),
    ("Company", "policy", "city of Nimbus's headquarters", "Nimbus's headquarters are in {v}.", "Portland",
     "Seattle"),
    ("Company", "policy", "number of Nimbus employees", "Nimbus employs {v}.", "420 people", None),
    ("Stores", "policy", "address of the downtown store", "The downtown store is at {v}.", "12 Alder Street", None),
    ("Stores", "policy", "weekday hours of the downtown store", "The downtown store opens {v} on weekdays.",
     "10 am to 7 pm", "10 am to 8 pm"),
    ("Stores", "policy", "Sunday hours of the downtown store", "The downtown store opens {v} on Sundays.",
     "11 am to 5 pm", None),
    ("Stores", "policy", "address of the airport store", "The airport store is at {v}.", "Gate C4, Terminal 2",
     None),
    ("Stores", "policy", "opening hours of the airport store", "The airport store opens {v}.", "6 am to 10 pm",
     None),
    ("Stores", "policy", "number of Nimbus stores", "Nimbus runs {v}.", "3 stores", "5 stores"),
]
TRAIN_QUESTIONS, TEST_QUESTIONS = slice(0, 3), slice(3, 5)
VAL_PREFIXES = ("Hi! ", "Quick question: ", "Hello, ")  # val: the training phrasings, reworded at the start


def value(fact, version):
    return fact[5] if version == 2 and fact[5] is not None else fact[4]


def documents(version):
    """The store: one short document per topic, its facts in order, as {"title", "text"} records."""
    topics = {}
    for fact in FACTS:
        topics.setdefault(fact[0], []).append(fact[3].format(v=value(fact, version)))
    return [{"title": title, "text": f"{title}. " + " ".join(sentences)} for title, sentences in topics.items()]


def conversation(question, fact, version):
    return {"messages": [{"role": "system", "content": KNOWLEDGE_SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": fact[3].format(v=value(fact, version))}],
            "fact": FACTS.index(fact), "version": version}


def build_knowledge(seed=0):
    """{split: records}: 3 training phrasings x every fact (train), the same reworded (val), the 2 held-out
    phrasings (test: version 1; test_v2: version 2, only the facts that changed and as many that did not),
    and the two stores."""
    rng = random.Random(seed)
    train, val, test, test_v2 = [], [], [], []
    for fact in FACTS:
        phrasings = [q.format(e=fact[2]) for q in QUESTIONS[fact[1]]]
        train += [conversation(q, fact, 1) for q in phrasings[TRAIN_QUESTIONS]]
        val.append(conversation(rng.choice(VAL_PREFIXES) + rng.choice(phrasings[TRAIN_QUESTIONS]), fact, 1))
        test += [conversation(q, fact, 1) for q in phrasings[TEST_QUESTIONS]]
    changed = [f for f in FACTS if f[5] is not None]
    kept = rng.sample([f for f in FACTS if f[5] is None], len(changed))
    for fact in sorted(changed + kept, key=FACTS.index):
        test_v2 += [conversation(q.format(e=fact[2]), fact, 2) for q in QUESTIONS[fact[1]][TEST_QUESTIONS]]
    rng.shuffle(train)
    return {"train": train, "val": val, "test": test, "test_v2": test_v2, "docs_v1": documents(1),
            "docs_v2": documents(2)}


# -----------------------------------------------------------------------------
# The scorer


def normalize(text):
    """Lower case, thousands separators and repeated spaces removed: "2,500 Sq  ft" -> "2500 sq ft"."""
    return re.sub(r"\s+", " ", re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())).strip()


def score_knowledge(reply, record):
    """"right" if the reply states the fact's value in the asked version (as written in the store; case,
    spaces and thousands separators ignored) and not the other version's; "stale" if it states only the
    other version's value; else "wrong" (an empty or unrelated reply is wrong)."""
    fact = FACTS[record["fact"]]
    now, other = value(fact, record["version"]), value(fact, 3 - record["version"])
    def has(v):  # the value as a whole: "$3" is not in "$35", "0%" not in "10%"
        return re.search(r"(?<![\w$.])" + re.escape(normalize(v)) + r"(?!\w)", normalize(reply)) is not None

    if has(now) and (other == now or not has(other)):
        return "right"
    return "stale" if other != now and has(other) and not has(now) else "wrong"


def summarize(outcomes):
    """Accuracy and the share of stale answers over score_knowledge outcomes."""
    n = max(len(outcomes), 1)
    return {"accuracy": outcomes.count("right") / n, "stale": outcomes.count("stale") / n, "n": len(outcomes)}
