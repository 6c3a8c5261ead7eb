"""Acceptance: the `openai` client's `chat.completions.parse` with a pydantic model returns a valid
object on the built-in SmolLM2-135M, 100 of 100 times with random seeds (grammar-constrained)."""

from __future__ import annotations

import random
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.service.conftest import make_settings, start_app

pytestmark = pytest.mark.slow
RUNS = 100


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "neutral"]
    likes_tea: bool


@pytest.fixture(scope="module")
def real_app(tmp_path_factory, smol_lm):
    tmp = tmp_path_factory.mktemp("parse")
    yield from start_app(make_settings(tmp, max_tokens=96), smol_lm)


def test_parse_100_of_100(real_app):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=real_app.client,
                           max_retries=0)
    rng = random.Random()
    ok = 0
    for _ in range(RUNS):
        r = client.chat.completions.parse(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Invent a person and describe them as JSON."}],
            response_format=Person,
            seed=rng.randrange(2**31),
            temperature=1.0,
            max_tokens=96,
        )
        person = r.choices[0].message.parsed
        assert isinstance(person, Person), r.choices[0].message.content
        ok += 1
    assert ok == RUNS
