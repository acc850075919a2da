"""tasks/triage.py: the built-in "triage" task (task tuning, the default): a support message in, one line of
strict JSON with four labels out. Generator and scorer together, so eval.py scores with the task's own rules.

A message is composed from independent parts: an opener, optional context, one problem sentence (sets
category and product), an optional urgency cue (sets priority), an optional tone sentence (sets sentiment)
and a sign-off, in varied order, with occasional typos (only in filler parts) and lowercasing. Every label is
a function of the parts actually present, so a perfect model can score 100% exact match.

    python data.py --generate      # rewrites data/triage/{train,val,test}.jsonl from build_triage() (seed 0)
"""

import json
import random

TRIAGE_FIELDS = ("category", "priority", "product", "sentiment")
TRIAGE_LABELS = {
    "category": ("billing", "refund", "bug", "account", "shipping", "feature_request"),
    "priority": ("low", "normal", "high", "urgent"),
    "product": ("mobile_app", "web_dashboard", "thermostat", "earbuds", "router", "unknown"),
    "sentiment": ("negative", "neutral", "positive"),
}
TRIAGE_SYSTEM = (
    "Triage the Nimbus support message. Reply with one line of JSON with the keys category, priority, "
    "product, sentiment. category: billing|refund|bug|account|shipping|feature_request. "
    "priority: urgent|high|normal|low. product: mobile_app|web_dashboard|thermostat|earbuds|router|unknown. "
    "sentiment: negative|neutral|positive."
)

SOFTWARE = ("mobile_app", "web_dashboard")
HARDWARE = ("thermostat", "earbuds", "router")
PRODUCT_NAMES = {  # how customers refer to each product
    "mobile_app": ("the mobile app", "your app", "the iPhone app", "the Android app", "the Nimbus app"),
    "web_dashboard": ("the web dashboard", "the dashboard", "the Nimbus website", "the online dashboard"),
    "thermostat": ("my thermostat", "the Nimbus thermostat", "the smart thermostat", "my Thermo X2"),
    "earbuds": ("my earbuds", "the Nimbus Buds", "the wireless earbuds", "my Buds Pro"),
    "router": ("my router", "the Nimbus router", "the mesh router", "the wifi router"),
    "unknown": ("my order", "my purchase", "your product", "the thing I bought"),
}
ACTIONS = ("open the settings page", "upload a photo", "export a report", "switch between tabs",
           "tap the notifications icon", "change the language", "scroll through my history")
FEATURES = {
    "mobile_app": ("a dark mode", "an offline mode", "a home screen widget", "Apple Watch support"),
    "web_dashboard": ("CSV export", "keyboard shortcuts", "a dark mode", "custom date ranges"),
    "thermostat": ("a vacation schedule", "humidity readings", "a child lock", "Google Home support"),
    "earbuds": ("a custom equalizer", "multipoint pairing", "a low-latency game mode", "in-ear detection"),
    "router": ("a guest network", "per-device speed limits", "a VPN server", "WPA3 support"),
    "unknown": ("gift cards", "a student discount", "a loyalty program", "more colour options"),
}
# category -> (template, products it can be about). {p} is a product mention, {P} the same capitalised.
PROBLEMS = {
    "billing": [
        ("I was charged twice for {p} this month.", SOFTWARE + HARDWARE + ("unknown",)),
        ("My card was billed ${a} for {p} but the listed price was ${b}.", SOFTWARE + HARDWARE + ("unknown",)),
        ("There is a charge on my statement for {p} that I don't recognise.", SOFTWARE + HARDWARE + ("unknown",)),
        ("The invoice for {p} has the wrong company name on it.", SOFTWARE + HARDWARE + ("unknown",)),
        ("I need to change the card I pay for {p} with.", SOFTWARE),
        ("My subscription for {p} renewed at a higher price than advertised.", SOFTWARE),
    ],
    "refund": [
        ("I'd like a refund for {p}.", SOFTWARE + HARDWARE + ("unknown",)),
        ("I want to return {p} and get my money back.", HARDWARE + ("unknown",)),
        ("Can I get my money back for {p}? It is not what I expected.", SOFTWARE + HARDWARE + ("unknown",)),
        ("Please refund {p}, I bought it by mistake.", SOFTWARE + HARDWARE + ("unknown",)),
        ("How do I send {p} back for a refund?", HARDWARE),
        ("I cancelled {p} during the trial and was promised a refund.", SOFTWARE),
    ],
    "bug": [
        ("{P} keeps crashing whenever I {action}.", SOFTWARE),
        ("{P} freezes after a few minutes of use.", SOFTWARE + HARDWARE),
        ("{P} stopped working properly after the latest update.", SOFTWARE + HARDWARE),
        ("{P} shows error {code} every time I {action}.", SOFTWARE),
        ("{P} keeps dropping its connection.", HARDWARE),
        ("{P} makes a loud buzzing noise.", HARDWARE),
        ("The battery on {p} is dead within an hour.", ("earbuds",)),
        ("{P} shows the wrong temperature.", ("thermostat",)),
    ],
    "account": [
        ("I can't log in to {p}, it says my password is wrong.", SOFTWARE),
        ("I never got the password reset email for {p}.", SOFTWARE),
        ("How do I change the email address on my account for {p}?", SOFTWARE),
        ("My account on {p} got locked after too many login attempts.", SOFTWARE),
        ("Someone else seems to have access to my account on {p}.", SOFTWARE),
        ("I want to delete my account and all of my data.", ("unknown",)),
        ("How do I merge my two accounts into one?", ("unknown",)),
    ],
    "shipping": [
        ("My order of {p} hasn't arrived yet.", HARDWARE),
        ("The tracking number for {p} hasn't updated in {n} days.", HARDWARE + ("unknown",)),
        ("I got the wrong colour of {p} in my delivery.", HARDWARE),
        ("Can you change the delivery address for {p}?", HARDWARE + ("unknown",)),
        ("The courier left {p} at the wrong address.", HARDWARE + ("unknown",)),
        ("My package was marked as delivered but never showed up.", ("unknown",)),
    ],
    "feature_request": [
        ("It would be great if {p} had {feature}.", SOFTWARE + HARDWARE),
        ("Could you add {feature} to {p}?", SOFTWARE + HARDWARE),
        ("Please consider adding {feature} in a future version of {p}.", SOFTWARE + HARDWARE),
        ("Are there any plans for {feature}?", ("unknown",)),
        ("I'd love to see {feature} some day.", ("unknown",)),
    ],
}
URGENCY = {
    "urgent": ("This is urgent.", "Please treat this as an emergency.", "I need this fixed immediately.",
               "Our whole team is blocked until this is solved.", "This needs attention right now."),
    "high": ("Please get back to me today if possible.", "This is fairly time-sensitive.",
             "I need this sorted by tomorrow.", "Could you prioritise this?", "I'd appreciate a quick reply."),
    "normal": (),
    "low": ("No rush on this.", "This isn't urgent at all.", "Whenever you get a chance is fine.",
            "Just a minor thing, take your time.", "Low priority, just letting you know."),
}
TONE = {
    "negative": ("This is really frustrating.", "I'm very disappointed.", "Honestly, this is unacceptable.",
                 "I'm losing my patience here.", "This is the third time I've had to write to you.",
                 "Really not happy about this."),
    "neutral": (),
    "positive": ("I love the product otherwise!", "You've always been great, so I'm sure you can help.",
                 "Big fan of Nimbus, by the way.", "Thanks for the great service as always.",
                 "Your team has been fantastic in the past."),
}
OPENERS = ("Hi,", "Hello,", "Hey,", "Hi there,", "Hello support team,", "Dear Nimbus support,", "Good morning,",
           "Good afternoon,", "Hi team,", "To whom it may concern,", "Hey Nimbus,")
CONTEXT = ("I've been a customer for {n} years.", "My order number is #{num}.", "I'm writing on behalf of my {rel}.",
           "I checked the help pages first.", "My account email is {email}.", "I bought it {n} weeks ago.",
           "I already spoke to someone on the phone about this.")
SIGNOFFS = ("Thanks,\n{name}", "Thank you,\n{name}", "Best,\n{name}", "Regards,\n{name}", "Cheers, {name}",
            "- {name}", "Thanks.", "Kind regards,\n{name}", "{name}")
NAMES = ("Maria", "Tom", "Aisha", "Kenji", "José", "Priya", "Sam", "Olga", "Liam", "Zoë", "Björn", "Fatima",
         "Chen", "Grace", "Mateo", "Noor", "Ivan", "Emma", "Kwame", "Lucía")
RELATIVES = ("mother", "father", "grandmother", "husband", "wife", "son", "daughter", "company")


def _typo(rng, text):
    """Swap two adjacent letters inside one longer word: a realistic slip that never touches a label cue."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def triage_example(rng, templates=None, n_names=None, n_mentions=None, frame=True):
    """One (message, label) pair. The label is decided first; the message is then built to express it.
    The knobs narrow the variety (the defaults use all of it; lab/overfitting.py turns them): templates, the
    indices of each category's PROBLEMS sentences to use; n_names, n_mentions, how many of NAMES and of each
    product's PRODUCT_NAMES; frame=False drops the greeting, context, sign-off, typos and lowercasing."""
    category = rng.choice(TRIAGE_LABELS["category"])
    allowed = PROBLEMS[category] if templates is None else [t for i, t in enumerate(PROBLEMS[category])
                                                            if i in templates]
    if not allowed:
        raise ValueError(f"templates {templates}: category {category} has no PROBLEMS sentence with these indices")
    template, products = rng.choice(allowed)
    product = rng.choice(products)
    priority = rng.choices(TRIAGE_LABELS["priority"], weights=(2, 4, 2, 2))[0]
    sentiment = rng.choices(TRIAGE_LABELS["sentiment"], weights=(3, 4, 2))[0]
    mention = rng.choice(PRODUCT_NAMES[product][:n_mentions])
    problem = template.format(
        p=mention, P=mention[0].upper() + mention[1:], action=rng.choice(ACTIONS),
        feature=rng.choice(FEATURES[product]), code=f"{rng.choice('EX')}-{rng.randint(100, 999)}",
        a=rng.randint(20, 300), b=rng.randint(5, 19) * 5, n=rng.randint(2, 14))
    name = rng.choice(NAMES[:n_names])

    def filler(s):  # typos only in parts that carry no label
        return _typo(rng, s) if rng.random() < 0.2 else s

    body, prefix = [problem], ""
    if priority == "urgent" and rng.random() < 0.25:
        prefix = rng.choice(("URGENT: ", "URGENT - ", "[URGENT] "))  # the other way to say it
    elif URGENCY[priority]:
        body.insert(rng.choice((0, 1)), rng.choice(URGENCY[priority]))
    if TONE[sentiment]:
        body.insert(rng.randint(0, len(body)), rng.choice(TONE[sentiment]))
    if frame and rng.random() < 0.4:
        body.insert(0, filler(rng.choice(CONTEXT).format(
            n=rng.randint(2, 9), num=rng.randint(10000, 99999), rel=rng.choice(RELATIVES),
            email=f"{name.lower()}{rng.randint(1, 99)}@example.com")))
    text = prefix + " ".join(body)
    if not frame:
        return text, {"category": category, "priority": priority, "product": product, "sentiment": sentiment}
    if rng.random() < 0.8:
        text = filler(rng.choice(OPENERS)) + rng.choice((" ", "\n", "\n\n")) + text
    if rng.random() < 0.7:
        text += rng.choice(("\n", "\n\n", " ")) + filler(rng.choice(SIGNOFFS).format(name=name))
    if rng.random() < 0.1:
        text = text.lower()
    label = {"category": category, "priority": priority, "product": product, "sentiment": sentiment}
    return text, label


def triage_reply(label):
    """The target reply: one line of JSON, keys always in TRIAGE_FIELDS order."""
    return json.dumps({k: label[k] for k in TRIAGE_FIELDS})


def parse_triage(text):
    """Parse a model's triage reply. Returns the label dict, or None unless the text (surrounding whitespace
    aside) is exactly one JSON object whose keys are TRIAGE_FIELDS with string values. Never raises."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if "\n" in text:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(TRIAGE_FIELDS) or not all(isinstance(v, str) for v in obj.values()):
        return None
    return {k: obj[k] for k in TRIAGE_FIELDS}


def build_triage(seed=0, n_train=3000, n_val=250, n_test=250, **knobs):
    """The triage splits as lists of records {"messages": [system, user, assistant]}. Messages are unique
    across all splits, so no test message was ever seen in training. knobs: triage_example's."""
    rng = random.Random(seed)
    seen, records, tries = set(), [], 0
    while len(records) < n_train + n_val + n_test:
        text, label = triage_example(rng, **knobs)
        tries += 1
        if tries > 100 * (n_train + n_val + n_test):
            raise ValueError(f"triage knobs {knobs} allow too few distinct messages for {n_train + n_val + n_test}")
        if text in seen:
            continue
        seen.add(text)
        records.append({"messages": [{"role": "system", "content": TRIAGE_SYSTEM},
                                     {"role": "user", "content": text},
                                     {"role": "assistant", "content": triage_reply(label)}]})
    return {"train": records[:n_train], "val": records[n_train:n_train + n_val],
            "test": records[n_train + n_val:]}


# -----------------------------------------------------------------------------
# Scoring


def score_triage(reply, reference):
    """{"exact", "valid", <field>...} each 0 or 1 for one reply. The format is part of the task: a reply that
    parse_triage refuses (not one line holding exactly one JSON object with the four keys: extra text, an
    extra or missing key, a second line) is invalid and scores 0 everywhere. Whitespace around it is fine."""
    got, want = parse_triage(reply), parse_triage(reference)
    if want is None:
        raise ValueError(f"reference reply is not a triage label: {reference!r}")
    scores = {"valid": int(got is not None), "exact": int(got == want)}
    for f in TRIAGE_FIELDS:
        scores[f] = int(got is not None and got[f] == want[f])
    return scores


def summarize(scores):
    """Exact match, valid-JSON rate and accuracy per field over a list of score_triage results."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {"n": len(scores), "exact_match": mean([s["exact"] for s in scores]),
            "valid": mean([s["valid"] for s in scores]),
            "fields": {f: mean([s[f] for s in scores]) for f in TRIAGE_FIELDS}}
