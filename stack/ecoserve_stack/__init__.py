"""The whole stack on one machine: `ecoserve up` starts the predictor, the scheduler and N
workers as plain processes; `ecoserve demo` does that and replays ShareGPT through the SDK.

This package is the integration layer, not a service: it depends on every service's distribution
and is the only code allowed to import more than one of them (tests/test_import_rules.py).
"""
