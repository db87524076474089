"""Parameters of a game-generation run: pydantic models the Prefect UI renders as forms.

The request's fields are typed once here (`Quantity`, `NumbersPerGame`, ... with their bounds, titles and
descriptions): `GenerationRequest` and the generate-games flow's signature both use these types, so the form
and the request cannot disagree."""

from __future__ import annotations

import json
import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operations.errors import UserError

SLIP_COLUMNS = 10  # the Mega-Sena slip is 6 rows x 10 columns: a row is a decade (1-10, 11-20, ...)
MAX_UNIVERSE = 60  # games are stored as 64-bit masks and drawn on the 6x10 slip
SlipNumber = Annotated[int, Field(ge=1, le=MAX_UNIVERSE)]
# A rule limit or region share left empty. Plain numbers rather than `int | None`: Prefect's form shows an
# int/None type switch for optional fields, a plain number field for these.
EMPTY = -1


def form_order(schema: dict) -> None:
    """Number a model's form fields in declaration order: the Prefect UI orders a form by each field's
    `position` (the server stores schemas as JSONB, which reorders keys, shortest first)."""
    for position, field_schema in enumerate(schema.get("properties", {}).values()):
        field_schema.setdefault("position", position)


def _empty_if_null(value):
    """null (what REST callers sent before the plain fields, and still may) is the empty value."""
    return EMPTY if value is None else value


class FirstNumberRegion(BaseModel):
    """A range of values of a game's smallest number, with the share of games it may take."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=form_order)

    first: int = Field(ge=1, le=MAX_UNIVERSE, title="From", description="Smallest first number in the region.")
    last: int = Field(ge=1, le=MAX_UNIVERSE, title="To", description="Largest first number in the region.")
    share: float = Field(
        default=float(EMPTY),
        ge=EMPTY,
        le=1.0,
        title="Target share",
        description="Fraction (0 to 1) of the games whose smallest number falls here. -1: the exact probability "
        "of that among the games the rules allow.",
    )

    @field_validator("share", mode="before")
    @classmethod
    def _null_is_empty(cls, value):
        return _empty_if_null(value)

    @model_validator(mode="after")
    def _ordered(self) -> FirstNumberRegion:
        if self.first > self.last:
            raise ValueError(f"region {self.first}-{self.last}: 'first' must not be greater than 'last'")
        if EMPTY < self.share < 0:
            raise ValueError(f"region {self.label}: share {self.share} is neither a fraction 0..1 nor -1 (empty)")
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


_EMPTY_RULE = "-1: the historical default if 'Fill empty rules with historical defaults' is on, else no limit."


# The lowest real value of each rule limit. The form's bounds start at -1 (empty); values between -1 and this
# are refused by GameRules' validator.
RULE_LIMITS = {"sum_min": 0, "sum_max": 0, "evens_min": 0, "evens_max": 0, "max_consecutive": 1, "max_per_row": 1,
               "min_rows": 1}


def _rule_limit(highest: int, title: str, description: str):
    return Field(default=EMPTY, ge=EMPTY, le=highest, title=title, description=f"{description} {_EMPTY_RULE}")


class GameRules(BaseModel):
    """Filters every game must pass. Empty fields take the historical default for the game size."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=form_order)

    historical_defaults: bool = Field(
        default=True,
        title="Fill empty rules with historical defaults",
        description="On: rules left empty take the central range of past draws for this game size "
        "(for 6 numbers: sum 118-248, 2-4 even numbers, runs of at most 2, at most 3 per row, "
        "at least 3 rows). Off: rules left empty are not applied.",
    )
    sum_min: int = _rule_limit(1300, "Minimum sum", "Smallest sum.")
    sum_max: int = _rule_limit(1300, "Maximum sum", "Largest sum.")
    evens_min: int = _rule_limit(20, "Minimum even numbers", "Fewest even numbers in a game.")
    evens_max: int = _rule_limit(20, "Maximum even numbers", "Most even numbers in a game.")
    max_consecutive: int = _rule_limit(
        20, "Longest run of consecutive numbers", "Longest allowed run such as 21-22-23 (a run of 3)."
    )
    max_per_row: int = _rule_limit(
        10, "Most numbers in one row", "Most numbers in one row (decade) of the 6x10 slip: 1-10, 11-20, ..."
    )
    min_rows: int = _rule_limit(6, "Fewest rows occupied", "Fewest rows of the slip occupied.")
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

    @field_validator(*RULE_LIMITS, mode="before")
    @classmethod
    def _null_is_empty(cls, value):
        return _empty_if_null(value)

    @model_validator(mode="after")
    def _consistent(self) -> GameRules:
        for name, lowest in RULE_LIMITS.items():
            value = getattr(self, name)
            if EMPTY < value < lowest:
                raise ValueError(f"rule '{name}': {value} is below {lowest}; -1 leaves the rule empty")
        for low, high, name in (
            (self.sum_min, self.sum_max, "sum"),
            (self.evens_min, self.evens_max, "even numbers"),
        ):
            if low != EMPTY and high != EMPTY and low > high:
                raise ValueError(f"rule '{name}': minimum {low} is greater than maximum {high}")
        for name, values in (("excluded_numbers", self.excluded_numbers), ("required_numbers", self.required_numbers)):
            if len(set(values)) != len(values):
                raise ValueError(f"rule '{name}': repeated numbers {sorted(values)}")
        both = sorted(set(self.excluded_numbers) & set(self.required_numbers))
        if both:
            raise ValueError(f"rules 'excluded_numbers' and 'required_numbers' both name {both}")
        return self


# The request's fields, typed once: GenerationRequest and the generate-games flow's parameters use these.
Quantity = Annotated[int, Field(
    ge=1, le=10_000_000, title="Games", description="How many distinct games to generate (1 to 10,000,000).",
)]
NumbersPerGame = Annotated[int, Field(
    ge=6, le=20, title="Numbers per game", description="6 to 20, as on the Mega-Sena slip.",
)]
HighestNumber = Annotated[int, Field(
    ge=20, le=MAX_UNIVERSE, title="Highest number",
    description="Games use the numbers 1..this (60 on the Mega-Sena slip).",
)]
Rules = Annotated[GameRules, Field(
    title="Rules", description="Filters every game passes; empty rules take historical defaults.",
)]
Regions = Annotated[list[FirstNumberRegion], Field(
    min_length=1, max_length=60, title="First-number regions",
    description="Balance of the games' smallest number: no region ever exceeds ceil(share x games).",
)]
Seed = Annotated[int, Field(
    ge=0, le=2**63 - 1, title="Seed", description="Random seed: the same seed draws the same candidates.",
)]


class GenerationRequest(BaseModel):
    """What an operator asks for: how many games, of which size, under which rules and balance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantity: Quantity = 10_000
    numbers_per_game: NumbersPerGame = 6
    highest_number: HighestNumber = MAX_UNIVERSE
    rules: Rules = Field(default_factory=GameRules)
    regions: Regions = Field(default_factory=lambda: list(DEFAULT_REGIONS))
    seed: Seed = 20_260_000

    @model_validator(mode="before")
    @classmethod
    def _default_regions_fit_the_universe(cls, data):
        """The default regions, left as they are, lose those no game can start in (41-55 with 6 numbers out of
        1..45): the operator changed the universe, not the balance. Regions an operator wrote are checked as
        written. Requests valid before keep their regions, so their runs keep their fingerprints."""
        if not isinstance(data, dict):
            return data
        regions = data.get("regions")
        if regions is not None:
            regions = [FirstNumberRegion.model_validate(r) if isinstance(r, dict) else r for r in regions]
        if regions is not None and regions != list(DEFAULT_REGIONS):
            return data
        highest = data.get("highest_number", cls.model_fields["highest_number"].default)
        k = data.get("numbers_per_game", cls.model_fields["numbers_per_game"].default)
        if not (isinstance(highest, int) and isinstance(k, int)):
            return data  # the field validators report it
        fitting = [r for r in DEFAULT_REGIONS if r.first <= highest - k + 1]
        return {**data, "regions": fitting or list(DEFAULT_REGIONS[:1])}

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        k, n = self.numbers_per_game, self.highest_number
        if k > n:
            raise ValueError(f"numbers_per_game {k} is larger than highest_number {n}")
        # The universe before any rule or region: a request it cannot satisfy is refused for that reason, not
        # for the regions or rules, which only look wrong because of it.
        universe = math.comb(n, k)
        if self.quantity > universe:
            exist = "1 distinct game exists" if universe == 1 else f"{universe:,} distinct games exist"
            raise ValueError(
                f"only {exist} with {k} numbers out of 1..{n}, fewer than the {self.quantity:,} games asked for: "
                "ask for fewer games, fewer numbers per game or a higher highest_number"
            )
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

    def fingerprint_json(self) -> str:
        """The request as JSON, with empty rule limits and region shares (-1) written as null, as they were
        when those fields were `int | None`: a run started before they became plain numbers keeps its
        fingerprint, so resuming or re-running it is not refused as a run key conflict."""
        data = self.model_dump(mode="json")
        for name in RULE_LIMITS:
            if data["rules"][name] == EMPTY:
                data["rules"][name] = None
        for region in data["regions"]:
            if region["share"] == EMPTY:
                region["share"] = None
        return json.dumps(data, separators=(",", ":"))


class InvalidRequest(UserError, ValueError):
    """The request's fields contradict each other (each is within its bounds); the message says how."""


def generation_request(**fields) -> GenerationRequest:
    """A checked GenerationRequest; raises InvalidRequest with every problem the model found."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise InvalidRequest(f"invalid generation request: {problems}") from None
