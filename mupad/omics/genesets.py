"""Gene-set collections: the GMT format, an immutable ordered `GeneSets`, the bundled default.

GMT: one set per line, tab separated: name, description, then the member genes. Enrichr's
"name<TAB><TAB>genes..." variant (empty description, trailing tab) and weighted members
("GENE,0.8"; the weight is ignored) are read too. Members are stored in canonical form
(see `mupad.omics.ids`): upper case, Ensembl version suffixes removed, duplicates dropped.

The bundled default, `default_gene_sets()`, is WikiPathways 2023 (human), 801 sets; see
mupad/assets/genesets/SOURCE.md for where it comes from and its licence.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from mupad.fileio import atomic_write_text
from mupad.omics.errors import GeneSetError
from mupad.omics.ids import GeneIdKind, canonical_gene_id, detect_gene_id_kind

DEFAULT_GMT = "wikipathways_2023_human.gmt"


class GeneSets(Mapping[str, tuple[str, ...]]):
    """An immutable, ordered mapping: gene-set name -> member genes (canonical ids).

    Args:
        sets: name -> genes. Order is kept; it is the column order of pathway scores.
        descriptions: optional name -> free text (the GMT's second column).
        source: where the collection came from (a path or a label), for messages.

    Raises GeneSetError for an empty collection, blank names, or sets without genes.
    """

    def __init__(
        self,
        sets: Mapping[str, Iterable[str]],
        descriptions: Mapping[str, str] | None = None,
        *,
        source: str = "",
    ) -> None:
        where = f" in {source}" if source else ""
        if not sets:
            raise GeneSetError(f"the gene-set collection{where} is empty; give at least one set")
        cleaned: dict[str, tuple[str, ...]] = {}
        empty: list[str] = []
        for name, genes in sets.items():
            key = str(name).strip()
            if not key or "\t" in key:
                raise GeneSetError(
                    f"gene-set name {name!r}{where} is blank or contains a tab; rename it"
                )
            if isinstance(genes, str):
                raise GeneSetError(
                    f"gene set {key!r}{where}: members must be a list of genes, not one string"
                )
            members = tuple(dict.fromkeys(canonical_gene_id(g) for g in genes if str(g).strip()))
            if not members:
                empty.append(key)
            cleaned[key] = members
        if empty:
            raise GeneSetError(
                f"{len(empty)} gene set(s){where} have no genes: {_first(empty)}; remove those "
                "lines from the GMT or add their member genes"
            )
        if len(cleaned) != len(sets):
            raise GeneSetError(f"gene-set names{where} repeat after stripping whitespace")
        descriptions = dict(descriptions or {})
        object.__setattr__(self, "_sets", MappingProxyType(cleaned))
        object.__setattr__(
            self, "_descriptions", MappingProxyType({k: descriptions.get(k, "") for k in cleaned})
        )
        object.__setattr__(self, "_source", source)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("GeneSets is immutable; build a new one instead")

    # Mapping protocol ----------------------------------------------------------------
    def __getitem__(self, name: str) -> tuple[str, ...]:
        try:
            return self._sets[name]
        except KeyError:
            raise KeyError(f"no gene set named {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneSets):
            return NotImplemented
        return list(self._sets.items()) == list(other._sets.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = f", source={self._source!r}" if self._source else ""
        return f"GeneSets({len(self)} sets, {len(self.genes)} genes{where})"

    # Queries -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sets)

    @property
    def source(self) -> str:
        return self._source

    @functools.cached_property
    def genes(self) -> frozenset[str]:
        """Every member gene of every set (canonical ids)."""
        return frozenset(g for members in self._sets.values() for g in members)

    @functools.cached_property
    def sha256(self) -> str:
        """Digest of the set names and their members, in order: the same for two collections
        that score alike, whatever their file formatting or descriptions."""
        lines = ("\t".join((name, *members)) for name, members in self._sets.items())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(members) for name, members in self._sets.items()}

    def description(self, name: str) -> str:
        return self._descriptions[name]

    @property
    def id_kind(self) -> GeneIdKind:
        """Whether members are symbols or Ensembl ids."""
        return detect_gene_id_kind(sorted(self.genes), what=f"gene sets {self._source}".strip())

    def subset(self, names: Iterable[str]) -> GeneSets:
        """The named sets, in the order given."""
        chosen = list(names)
        unknown = [n for n in chosen if n not in self._sets]
        if unknown:
            raise GeneSetError(f"unknown gene set(s): {_first(unknown)}")
        return GeneSets(
            {n: self._sets[n] for n in chosen},
            {n: self._descriptions[n] for n in chosen},
            source=self._source,
        )


def _first(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_gmt(path: str | Path) -> GeneSets:
    """Read a GMT file into GeneSets (set order = line order).

    Raises GeneSetError for a missing file, lines without genes, or repeated set names.
    """
    path = Path(path)
    if not path.is_file():
        raise GeneSetError(f"gene-set file {path} does not exist; pass the path of a .gmt file")
    sets: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    empty: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\r\n").split("\t")
            name = fields[0].strip()
            if not name:
                raise GeneSetError(f"{path}:{number}: the gene-set name (first column) is blank")
            if name in sets:
                raise GeneSetError(
                    f"{path}:{number}: gene set {name!r} appears twice; set names must be unique"
                )
            genes = [f.split(",")[0].strip() for f in fields[2:]]
            genes = [g for g in genes if g]
            if not genes:
                empty.append(f"{name} (line {number})")
            sets[name] = genes
            descriptions[name] = fields[1].strip() if len(fields) > 1 else ""
    if not sets:
        raise GeneSetError(f"{path} holds no gene sets; is it a GMT file?")
    if empty:
        raise GeneSetError(
            f"{path}: {len(empty)} gene set(s) have no genes: {_first(empty)}; a GMT line is "
            "name<TAB>description<TAB>gene1<TAB>gene2...; remove those lines or add their genes"
        )
    return GeneSets(sets, descriptions, source=str(path))


def write_gmt(gene_sets: GeneSets, path: str | Path) -> None:
    """Write GeneSets as GMT; the file appears complete or not at all."""
    path = Path(path)
    lines = [
        "\t".join([name, gene_sets.description(name), *genes]) for name, genes in gene_sets.items()
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def bundled_gene_set_path(name: str = DEFAULT_GMT) -> Path:
    """Path of a GMT file shipped in mupad/assets/genesets."""
    path = Path(str(resources.files("mupad") / "assets" / "genesets" / name))
    if not path.is_file():
        raise GeneSetError(
            f"bundled gene-set file {name} is missing from {path.parent}; reinstall mupad"
        )
    return path


@functools.lru_cache(maxsize=1)
def default_gene_sets() -> GeneSets:
    """The bundled default collection: WikiPathways 2023, human, gene symbols (801 sets)."""
    return load_gmt(bundled_gene_set_path())
