"""Parameters of a game-generation run: pydantic models the Prefect UI renders as forms."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

SLIP_COLUMNS = 10  # the Mega-Sena slip is 6 rows x 10 columns: a row is a decade (1-10, 11-20, ...)
MAX_UNIVERSE = 60  # games are stored as 64-bit masks and drawn on the 6x10 slip
SlipNumber = Annotated[int, Field(ge=1, le=MAX_UNIVERSE)]


class FirstNumberRegion(BaseModel):
    """A range of values of a game's smallest number, with the share of games it may take."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first: int = Field(ge=1, le=MAX_UNIVERSE, title="From", description="Smallest first number in the region.")
    last: int = Field(ge=1, le=MAX_UNIVERSE, title="To", description="Largest first number in the region.")
    share: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        title="Target share",
        description="Fraction of the games whose smallest number falls here. Empty: the exact probability "
        "of that among the games the rules allow.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> FirstNumberRegion:
        if self.first > self.last:
            raise ValueError(f"region {self.first}-{self.last}: 'first' must not be greater than 'last'")
        return self

    @property
    def label(self) -> str:
        return f"{self.first}-{self.last}"


DEFAULT_REGIONS: tuple[FirstNumberRegion, ...] = (
    FirstNumberRegion(first=1, last=10),
    FirstNumberRegion(first=11, last=20),
    FirstNumberRegion(first=21, last=30),
    FirstNumberRegion(first=31, last=40),
    FirstNumberRegion(first=41, last=55),
)


_NONE = "None: the historical default (switch above on) or no limit (off)."


class GameRules(BaseModel):
    """Filters every game must pass. Empty fields take the historical default for the game size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    historical_defaults: bool = Field(
        default=True,
        title="Fill empty rules with historical defaults",
        description="On: rules left empty take the central range of past draws for this game size "
        "(for 6 numbers: sum 118-248, 2-4 even numbers, runs of at most 2, at most 3 per row, "
        "at least 3 rows). Off: rules left empty are not applied.",
    )
    sum_min: int | None = Field(
        default=None, ge=0, le=1300, title="Minimum sum", description=f"Smallest sum. {_NONE}"
    )
    sum_max: int | None = Field(
        default=None, ge=0, le=1300, title="Maximum sum", description=f"Largest sum. {_NONE}"
    )
    evens_min: int | None = Field(
        default=None, ge=0, le=20, title="Minimum even numbers",
        description=f"Fewest even numbers in a game. {_NONE}"
    )
    evens_max: int | None = Field(
        default=None, ge=0, le=20, title="Maximum even numbers",
        description=f"Most even numbers in a game. {_NONE}"
    )
    max_consecutive: int | None = Field(
        default=None,
        ge=1,
        le=20,
        title="Longest run of consecutive numbers",
        description=f"Longest allowed run such as 21-22-23 (a run of 3). {_NONE}",
    )
    max_per_row: int | None = Field(
        default=None,
        ge=1,
        le=10,
        title="Most numbers in one row",
        description=f"Most numbers in one row (decade) of the 6x10 slip: 1-10, 11-20, ... {_NONE}",
    )
    min_rows: int | None = Field(
        default=None, ge=1, le=6, title="Fewest rows occupied",
        description=f"Fewest rows of the slip occupied. {_NONE}"
    )
    excluded_numbers: list[SlipNumber] = Field(
        default_factory=list,
        max_length=54,
        title="Numbers to exclude",
        description="No game contains any of these.",
    )
    required_numbers: list[SlipNumber] = Field(
        default_factory=list,
        max_length=19,
        title="Numbers to require",
        description="Every game contains all of these.",
    )
    exclude_past_draws: bool = Field(
        default=True,
        title="Exclude past draws",
        description="Drop games equal to (6 numbers) or containing (7-20 numbers) a past Mega-Sena draw.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> GameRules:
        for low, high, name in (
            (self.sum_min, self.sum_max, "sum"),
            (self.evens_min, self.evens_max, "even numbers"),
        ):
            if low is not None and high is not None and low > high:
                raise ValueError(f"rule '{name}': minimum {low} is greater than maximum {high}")
        for name, values in (("excluded_numbers", self.excluded_numbers), ("required_numbers", self.required_numbers)):
            if len(set(values)) != len(values):
                raise ValueError(f"rule '{name}': repeated numbers {sorted(values)}")
        both = sorted(set(self.excluded_numbers) & set(self.required_numbers))
        if both:
            raise ValueError(f"rules 'excluded_numbers' and 'required_numbers' both name {both}")
        return self


class GenerationRequest(BaseModel):
    """What an operator asks for: how many games, of which size, under which rules and balance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantity: int = Field(
        default=10_000, ge=1, le=10_000_000, title="Games", description="How many distinct games to generate."
    )
    numbers_per_game: int = Field(
        default=6, ge=6, le=20, title="Numbers per game", description="6 to 20, as on the Mega-Sena slip."
    )
    highest_number: int = Field(
        default=60, ge=20, le=MAX_UNIVERSE, title="Highest number", description="Games use numbers 1..this."
    )
    rules: GameRules = Field(default_factory=GameRules, title="Rules", description="Filters every game passes.")
    regions: list[FirstNumberRegion] = Field(
        default_factory=lambda: list(DEFAULT_REGIONS),
        min_length=1,
        max_length=60,
        title="First-number regions",
        description="Balance of the games' smallest number: no region ever exceeds ceil(share x games).",
    )
    seed: int = Field(
        default=20_260_000, ge=0, le=2**63 - 1, title="Seed", description="Random seed (same seed, same candidates)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        k, n = self.numbers_per_game, self.highest_number
        if k > n:
            raise ValueError(f"numbers_per_game {k} is larger than highest_number {n}")
        spans = sorted((r.first, r.last) for r in self.regions)
        for (a_first, a_last), (b_first, b_last) in zip(spans, spans[1:]):
            if b_first <= a_last:
                raise ValueError(f"regions {a_first}-{a_last} and {b_first}-{b_last} overlap")
        for region in self.regions:
            if region.first > n - k + 1:
                raise ValueError(
                    f"unknown region {region.label}: with {k} numbers out of {n} the smallest number "
                    f"is at most {n - k + 1}"
                )
        bad = [v for v in (*self.rules.excluded_numbers, *self.rules.required_numbers) if v > n]
        if bad:
            raise ValueError(f"rules name numbers {bad} above highest_number {n}")
        if len(self.rules.required_numbers) > k:
            raise ValueError(f"rule 'required_numbers' names {len(self.rules.required_numbers)} numbers, "
                             f"more than the {k} of a game")
        return self
