"""The local stack for `make dev` and the end-to-end tests: embedded Postgres, the Cloud Tasks
emulator, the SMS sink and the functions under functions-framework."""
