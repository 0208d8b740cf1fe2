"""The store's layout: every dataset in the file, declared once.

The writer creates datasets from these declarations, the reader checks and reads them, the upgrade
path adds the ones an older store lacks, and `EpisodeReader.columns()` publishes the decision
columns that name a public form. Adding a column is one declaration here, plus where its value
comes from an episode and goes back into one (`encoding`).

File layout (columnar, so loading every decision of 10,000 episodes is one read per column):

- ``/decisions/<column>``: one row per decision point, episodes back to back.
- ``/episodes/<column>``: the episode index, one row per episode (``offset``/``length`` locate its
  decisions; ``meta_offset``/``meta_length`` its JSON metadata in ``/meta_bytes``).
- ``/meta_bytes``, ``/reason_bytes``: UTF-8 text packed into byte arrays. SWMR handles
  variable-length strings badly, so text is bytes plus offset/length columns.
- ``/blueprint_names``: the vocabulary that ``/decisions/blueprint`` codes index (-1 = none).
- Columns added after the first stores (``absent`` set): each decision's behaviour probability,
  each episode's final observation. A store without them still opens and reads them as absent;
  the first writer to open such a store adds them (rewriting it, as a recovery does). Rows a
  writer that predates them did not write read as absent too (their fill value).
- ``/commit``: how many rows of each of the above are committed (`Counts`). Readers use nothing
  beyond it.
- File attributes: format, store version, observation schema name/version, feature names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ...contracts import N_FEATURES

STORE_FORMAT = "simic-episode-store"
STORE_VERSION = 1

# Rows per chunk. A chunk is HDF5's unit of I/O: appending one 25-decision episode rewrites the
# last chunk of each column, so chunks stay small (<= ~220 KB); reading 250k decisions is still
# one read call per column.
DECISION_CHUNK = 8192
OBSERVATION_CHUNK = 2048
EPISODE_CHUNK = 1024
BYTES_CHUNK = 65536
BLUEPRINT_NAME_BYTES = 64


@dataclass(frozen=True)
class Column:
    """One column of the decision table or of the episode index.

    `absent` is what rows read as in a store written before the column existed (None: every
    store has it). `public` is the column's name in `EpisodeReader.columns()` (None: internal).
    `flag` marks a 0/1 column that readers hand out as bool.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    absent: float | None = None
    public: str | None = None
    flag: bool = False


# Floats other than observations are float64 so that an episode read back equals the one appended
# (Python floats round-trip exactly). Declared in the order `columns()` lists them.
DECISION_COLUMNS: tuple[Column, ...] = (
    Column("observations", "<f4", (N_FEATURES,), public="observation"),
    Column("actions", "i1", public="action"),
    Column("valid", "u1", public="valid", flag=True),
    Column("confidence", "<f8", public="confidence"),
    Column("expert_actions", "i1", public="expert_action"),  # -1: no expert label
    Column("reward", "<f8", public="reward"),
    Column("accuracy_change", "<f8", public="accuracy_change"),
    Column("loss_change", "<f8", public="loss_change"),
    Column("val_accuracy_after", "<f8", public="val_accuracy_after"),
    Column("seed_alive", "u1", public="seed_alive", flag=True),
    Column("stage_after", "i1", public="stage_after"),
    Column("blueprint", "<i2", public="blueprint"),  # index into /blueprint_names; -1: none
    Column("behaviour_prob", "<f8", absent=-1.0, public="behaviour_prob"),  # -1: unknown
    Column("reason_offset", "<i8"),
    Column("reason_length", "<i4"),
)

EPISODE_COLUMNS: tuple[Column, ...] = (
    Column("offset", "<i8"),
    Column("length", "<i4"),
    Column("seed", "<i8"),
    Column("index", "<i8"),
    Column("rng_seed", "<i8"),
    Column("key", "S16"),
    Column("final_accuracy", "<f8"),
    Column("best_accuracy", "<f8"),
    Column("test_accuracy", "<f8"),
    Column("seeds_created", "<i4"),
    Column("seeds_fossilized", "<i4"),
    Column("seeds_culled", "<i4"),
    Column("meta_offset", "<i8"),
    Column("meta_length", "<i4"),
    # The observation after the last epoch: zeros and 0 where unknown.
    Column("final_observation", "<f4", (N_FEATURES,), absent=0.0),
    Column("has_final_observation", "u1", absent=0, flag=True),
)


class Counts(NamedTuple):
    """The commit record: committed rows of each growing dataset."""

    n_episodes: int = 0
    n_decisions: int = 0
    n_meta_bytes: int = 0
    n_reason_bytes: int = 0
    n_blueprints: int = 0


@dataclass(frozen=True)
class Dataset:
    """One growing dataset of the file: its rows' dtype and trailing shape, its chunk length, the
    `Counts` field that says how many rows are committed, and (if optional) what absent rows read as."""

    dtype: str
    shape: tuple[int, ...]
    chunk: int
    counted_by: str
    absent: float | None = None


def _datasets() -> dict[str, Dataset]:
    layout: dict[str, Dataset] = {}
    for col in DECISION_COLUMNS:
        chunk = OBSERVATION_CHUNK if col.shape else DECISION_CHUNK
        layout[f"decisions/{col.name}"] = Dataset(col.dtype, col.shape, chunk, "n_decisions", col.absent)
    for col in EPISODE_COLUMNS:
        layout[f"episodes/{col.name}"] = Dataset(col.dtype, col.shape, EPISODE_CHUNK, "n_episodes",
                                                 col.absent)
    layout["meta_bytes"] = Dataset("u1", (), BYTES_CHUNK, "n_meta_bytes")
    layout["reason_bytes"] = Dataset("u1", (), BYTES_CHUNK, "n_reason_bytes")
    layout["blueprint_names"] = Dataset(f"S{BLUEPRINT_NAME_BYTES}", (), 256, "n_blueprints")
    return layout


#: Every growing dataset, by its path in the file.
LAYOUT: dict[str, Dataset] = _datasets()
DECISION_NAMES: tuple[str, ...] = tuple(col.name for col in DECISION_COLUMNS)
EPISODE_NAMES: tuple[str, ...] = tuple(col.name for col in EPISODE_COLUMNS)
