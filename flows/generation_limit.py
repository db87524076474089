from flows.concurrency import GAMES_LIMIT, ensure_games_limit, generation_slot  # noqa: F401  (import path kept for
# branches not merged yet; the lead deletes this file: import flows.concurrency)
