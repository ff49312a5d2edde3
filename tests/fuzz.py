"""How hard the parsers of hostile input are fuzzed: every parser that takes input from anyone (mail, DHT
values, datagrams) is driven with Hypothesis under `FUZZ`. CI (CI set, as .ci/run passes it) runs
FUZZ_EXAMPLES_CI inputs a test, a developer's run FUZZ_EXAMPLES_DEV."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES_CI = 10_000
FUZZ_EXAMPLES_DEV = 300
FUZZ_EXAMPLES = FUZZ_EXAMPLES_CI if os.environ.get("CI") else FUZZ_EXAMPLES_DEV

# No deadline: a slow example on a busy CI machine is not a failure; what fails is an escaped exception.
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
