"""Generated from proto/*.proto by `make proto`; never edit by hand (a test checks they match)."""
