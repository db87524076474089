from flows.concurrency import GAMES_LIMIT, ensure_games_limit, generation_slot  # noqa: F401  (old path, removed when the branches merge)
