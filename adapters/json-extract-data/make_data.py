"""Writes train.jsonl and eval.jsonl for the `json-extract` example adapter.

Task: read one sentence about a person and answer with exactly one JSON object
{"name": str, "age": int, "city": str} and nothing else. The base model chats around the
answer or misreads fields; the adapter learns the schema. Held-out examples use names and
cities that never appear in training. Deterministic (seeded), standard library only.
"""
import json
import random

rng = random.Random(2026)

TRAIN_NAMES = ["Maria", "Jonas", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sofia",
               "Arjun", "Elena", "Tomas", "Yara", "Noah", "Ingrid", "Mateo", "Leila", "Hugo", "Nadia",
               "Oscar", "Priya", "Felix", "Amara", "Ivan", "Lucia", "Ravi", "Greta", "Samir", "Hana"]
EVAL_NAMES = ["Beatriz", "Dmitri", "Keiko", "Lorenzo", "Zainab", "Emil", "Ximena", "Tariq", "Maren", "Kofi"]
TRAIN_CITIES = ["Lyon", "Oslo", "Kyoto", "Porto", "Cairo", "Dublin", "Lima", "Tallinn", "Accra", "Seville",
                "Pune", "Graz", "Brno", "Quito", "Perth", "Bergen", "Cusco", "Tunis", "Gdansk", "Osaka"]
EVAL_CITIES = ["Valencia", "Hanoi", "Lagos", "Zurich", "Montreal", "Krakow", "Nairobi", "Bilbao"]

TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, moved to {city} last spring.",
    "Born {age} years ago, {name} now works in {city}.",
    "In {city} you will find {name}, who just turned {age}.",
    "My neighbour {name} ({age}) grew up in {city}.",
    "{name} from {city} celebrated a {age}th birthday yesterday.",
    "At {age}, {name} opened a small bakery in {city}.",
    "The new teacher in {city} is {name}; she is {age}.",
    "{name} has lived in {city} since the age of {age}.",
    "Meet {name}: {age} years old, based in {city}, loves chess.",
]

INSTRUCTIONS = [
    "Extract the person's name, age and city as JSON.",
    "Return a JSON object with the fields name, age and city.",
    "Read the sentence and answer only with JSON: name, age, city.",
]


def example(names, cities):
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
    text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": answer}


with open("train.jsonl", "w") as f:
    for _ in range(320):
        f.write(json.dumps(example(TRAIN_NAMES, TRAIN_CITIES)) + "\n")
with open("eval.jsonl", "w") as f:
    for _ in range(60):
        f.write(json.dumps(example(EVAL_NAMES, EVAL_CITIES)) + "\n")
