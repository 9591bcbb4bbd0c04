"""A synthetic news corpus of our own making, for benchmarks that must run without
../shared: deterministic articles of realistic length (400-900 words) built from sentence
templates with people, organisations, places and topics, so NER and topics get real work.

    python -m bench.synthetic --articles 500 > synthetic.jsonl

Records have the fields of the shared corpus files: url, title, body_text, publisher.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator

PEOPLE = ["Maria Okafor", "James Whitfield", "Chen Lihua", "Ana Beatriz Souza", "Rahul Mehta", "Ingrid Halvorsen",
          "Tomasz Nowak", "Fatima Al-Sayed", "David Klein", "Yuki Tanaka", "Olusegun Adeyemi", "Claire Dubois",
          "Miguel Herrera", "Sofia Rossi", "Pieter de Vries", "Amara Nwosu", "Elena Petrova", "Kwame Mensah"]
ROLES = ["Health Minister", "spokesperson", "chief executive", "governor", "mayor", "Foreign Minister",
         "director", "senior economist", "aid coordinator", "President"]
ORGS = ["the World Health Organization", "the Red Cross", "Médecins Sans Frontières", "the European Commission",
        "Northgate Logistics", "the International Monetary Fund", "Helios Energy", "the Ministry of Health",
        "the United Nations", "Atlas Pharmaceuticals", "the Central Bank", "the World Food Programme",
        "Meridian Shipping", "the Port Authority", "Orion Semiconductors", "the National Weather Service"]
PLACES = ["Lagos", "Manila", "Lima", "Kyiv", "Nairobi", "Jakarta", "Dhaka", "Quito", "Beirut", "Hanoi",
          "Accra", "Tbilisi", "Rotterdam", "Chennai", "Valparaíso", "Casablanca", "Russia", "Brazil", "Kenya",
          "Germany", "Japan", "Canada", "Indonesia", "Peru"]
SUPPLIES = ["ventilators", "surgical masks", "oxygen concentrators", "test kits", "medical equipment",
            "vaccines", "water purification tablets", "tents", "food parcels", "generators"]
SECTORS = ["grain exports", "chip production", "shipping rates", "electricity prices", "interest rates",
           "factory output", "tourism revenue", "housing starts"]
EVENTS = ["flooding", "an earthquake", "a heatwave", "a cyclone", "wildfires", "a drought", "a cholera outbreak"]

TEMPLATES = [
    "{person}, the {role}, said on {day} that {org} would send {n} {supply} to {place} within two weeks.",
    "Officials in {place} said the shipment of {supply} from {org} arrived late on {day}.",
    "\"We are doing everything we can,\" {person} told reporters in {place}, adding that talks with {org} continued.",
    "{org} warned that {sector} in {place} could fall by {n} percent this year.",
    "After {event} hit {place}, {org} appealed for {supply} and emergency funding.",
    "{person} met {person2} in {place} on {day} to discuss {sector} and regional security.",
    "The {role} of {org}, {person}, declined to comment on the report.",
    "Analysts at {org} expect {sector} to recover slowly, citing weak demand in {place}.",
    "Residents of {place} described long queues for {supply} as {event} continued.",
    "In a statement, {org} said it had delivered {n} tonnes of {supply} to {place} since {day}.",
    "{person} criticised the response, saying {place} needed more {supply} and fewer promises.",
    "Markets in {place} rose on {day} after {org} announced new measures on {sector}.",
    "The agreement between {org} and the government of {place} was signed by {person}.",
    "Local media in {place} reported that {n} people had been evacuated because of {event}.",
    "{org} plans to open a new office in {place}, {person} said in an interview.",
    "Critics argue that {sector} depends too heavily on trade with {place}.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def sentence(rng: random.Random) -> str:
    person, person2 = rng.sample(PEOPLE, 2)
    return rng.choice(TEMPLATES).format(
        person=person, person2=person2, role=rng.choice(ROLES), org=rng.choice(ORGS), place=rng.choice(PLACES),
        supply=rng.choice(SUPPLIES), sector=rng.choice(SECTORS), event=rng.choice(EVENTS),
        day=rng.choice(DAYS), n=rng.randint(2, 900))


def article(number: int, seed: int = 7) -> dict[str, str]:
    rng = random.Random(seed * 1_000_003 + number)
    paragraphs = [" ".join(sentence(rng) for _ in range(rng.randint(3, 5))) for _ in range(rng.randint(6, 12))]
    title = sentence(rng).split(",")[0].rstrip(".")
    return {"url": f"https://synthetic.newsbeam.test/{number}", "title": title,
            "body_text": "\n".join(paragraphs), "publisher": "newsbeam synthetic"}


def corpus(count: int, seed: int = 7) -> Iterator[dict[str, str]]:
    return (article(number, seed) for number in range(count))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for record in corpus(args.articles, args.seed):
        print(json.dumps(record, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
