"""Region taxonomies (data in taxonomies/*.json) and the region an archive's own header claims.

Matching rules (docs/taxonomy.md): text is normalised (upper case, accents stripped, German umlauts also read
as AE/OE/UE, punctuation to spaces) and region terms are found as whole words; the longest term wins
("LUMBAR SPINE" over "SPINE"). Words that are not terms (laterality, views, "XR", "Rö") are ignored.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from radregion.errors import RadiographError

BUILTIN_DIR = Path(__file__).with_name("taxonomies")
ARCHIVE_FIELDS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")  # most trusted first

# Words that never name a region: a term made only of these is rejected when a taxonomy is loaded.
IGNORED_WORDS = frozenset(
    "LEFT RIGHT LT RT L R BILATERAL BILAT BIL BOTH LI RE LINKS RECHTS BDS BEIDSEITS ESQ ESQUERDO ESQUERDA DIR "
    "DIREITO DIREITA AP PA LAT LATERAL OBL OBLIQUE VIEW VIEWS V EB EBENE EBENEN IN AND E DE DO DA DOS DAS UND MIT "
    "WITH OF XR CR DX RX RO ROE RONTGEN ROENTGEN X RAY XRAY PERFIL PORTABLE".split()
)
_REGION_KEYS = {"name", "description", "out_of_domain", "body_part_terms", "snomed", "synonyms"}
_BODY_PART_TERM = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM CS value
_GERMAN = str.maketrans({"Ä": "AE", "Ö": "OE", "Ü": "UE", "ä": "ae", "ö": "oe", "ü": "ue"})


def normalise(text: str, umlauts_as_digraphs: bool = True) -> str:
    """Upper case, accents stripped, ß -> SS, punctuation -> single spaces ("Rö Knie li." -> "ROE KNIE LI")."""
    text = str(text)
    if umlauts_as_digraphs:
        text = text.translate(_GERMAN)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.findall(r"[A-Z0-9]+", text.upper()))


@dataclass(frozen=True)
class Region:
    name: str
    description: str = ""
    out_of_domain: bool = False
    body_part_terms: tuple = ()
    snomed: str | None = None
    synonyms: tuple = ()


@dataclass(frozen=True)
class ArchiveLabel:
    """What the archive's header claims. `regions`: every region the deciding field names (multi-label)."""

    region: str | None
    field: str | None
    matched: str | None
    conflicts: tuple = ()  # ((field, region or None for a generic term, text), ...)
    regions: tuple = ()


@dataclass(frozen=True)
class _Hit:
    start: int
    length: int
    text: str  # the normalised words matched
    region: str | None  # None for an ambiguous generic term
    candidates: tuple  # regions the term may mean


class Taxonomy:
    def __init__(self, name: str, regions, description: str = "", ambiguous=(), source: str | None = None):
        self.name = name
        self.description = description
        self.regions = tuple(regions)
        self.ambiguous = tuple((tuple(terms), tuple(cands)) for terms, cands in ambiguous)
        self.source = source or f"taxonomy '{name}'"
        self._terms = self._build_index()
        self._longest = max(len(key) for key in self._terms)

    def __repr__(self):
        return f"Taxonomy({self.name!r}, {len(self.regions)} regions)"

    # --- regions ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.regions]

    @property
    def in_domain(self) -> list[str]:
        return [r.name for r in self.regions if not r.out_of_domain]

    def get(self, name: str) -> Region:
        """The region called `name` (case-insensitive); KeyError naming the valid ones."""
        for region in self.regions:
            if region.name == name or region.name.casefold() == str(name).casefold():
                return region
        raise KeyError(f"{name!r} is not a region of taxonomy {self.name} (regions: {', '.join(self.names)})")

    def index(self, name: str) -> int:
        return self.names.index(self.get(name).name)

    def check_names(self, names, source, where: str = "") -> tuple[str, ...]:
        """`names` spelled as the taxonomy spells them (case-insensitive): the one check of user-given region names
        (labels CSVs, --exclude-regions). RadiographError(source, "WHERE: unknown region(s) ... (known: ...)")."""
        known = {name.casefold(): name for name in self.names}
        unknown = [str(name) for name in names if str(name).casefold() not in known]
        if unknown:
            raise RadiographError(
                source,
                f"{where + ': ' if where else ''}unknown region(s) {', '.join(unknown)} "
                f"(known: {', '.join(self.names)})",
            )
        return tuple(known[str(name).casefold()] for name in names)

    def body_part_term(self, name: str) -> str | None:
        """The first CID 4031 defined term of a region (for BodyPartExamined); None where DICOM defines none."""
        terms = self.get(name).body_part_terms
        return terms[0] if terms else None

    # --- text matching ---------------------------------------------------------------------------------
    def match_text(self, text) -> str | None:
        """The first region a free text names, or None (also None for generic terms such as SPINE)."""
        regions = self.match_all(text)
        return regions[0] if regions else None

    def match_all(self, text) -> tuple:
        """Every region a text names, in order of mention ("HAND WRIST" -> ("Hand", "Wrist"))."""
        return tuple(dict.fromkeys(h.region for h in self._scan(text) if h.region))

    def archive_label(self, meta: dict) -> ArchiveLabel:
        """The region the header claims: fields in ARCHIVE_FIELDS order; disagreeing fields are conflicts."""
        named, generic = [], []  # (field, hits, text)
        for field in ARCHIVE_FIELDS:
            value = meta.get(field)
            text = "" if value is None else str(value).strip()
            hits = self._scan(text) if text else []
            if any(h.region for h in hits):
                named.append((field, [h for h in hits if h.region], text))
            elif hits:
                generic.append((field, hits, text))
        if not named:
            if generic:
                field, hits, _ = generic[0]
                why = "; ".join(f"{h.text}: ambiguous ({_either(h.candidates)})" for h in hits)
                return ArchiveLabel(None, field, why)
            return ArchiveLabel(None, None, None)
        common = None
        for _, hits, _ in named + generic:
            allowed = {r for h in hits for r in (h.candidates if h.region is None else (h.region,))}
            common = allowed if common is None else common & allowed
        field, hits, _ = named[0]
        agreed = tuple(dict.fromkeys(h.region for h in hits if h.region in common))
        if not agreed:
            fields = sorted(named + generic, key=lambda entry: ARCHIVE_FIELDS.index(entry[0]))
            conflicts = tuple((f, next((h.region for h in hs if h.region), None), text) for f, hs, text in fields)
            return ArchiveLabel(None, None, None, conflicts)
        matched = next(h.text for h in hits if h.region == agreed[0])
        return ArchiveLabel(agreed[0], field, matched, (), agreed)

    def _scan(self, text) -> list[_Hit]:
        """Non-overlapping term hits, longest first; generic terms are dropped when a region term is present."""
        best = []
        text = str(text)
        variants = [normalise(text)]
        if any(c in "ÄÖÜäöü" for c in text):
            variants.append(normalise(text, umlauts_as_digraphs=False))
        for variant in variants:
            hits = self._scan_words(variant.split())
            if sum(h.length for h in hits) > sum(h.length for h in best):
                best = hits
        if any(h.region for h in best):
            best = [h for h in best if h.region]
        return best

    def _scan_words(self, words: list[str]) -> list[_Hit]:
        found = []
        for start in range(len(words)):
            for length in range(min(self._longest, len(words) - start), 0, -1):
                key = tuple(words[start : start + length])
                if key in self._terms:
                    found.append((start, length, key))
        taken, hits = set(), []
        for start, length, key in sorted(found, key=lambda f: (-f[1], -len(" ".join(f[2])), f[0])):
            span = set(range(start, start + length))
            if not span & taken:
                taken |= span
                region, candidates = self._terms[key]
                hits.append(_Hit(start, length, " ".join(key), region, candidates))
        return sorted(hits, key=lambda h: h.start)

    # --- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "regions": [
                {
                    "name": r.name,
                    "description": r.description,
                    "out_of_domain": r.out_of_domain,
                    "body_part_terms": list(r.body_part_terms),
                    "snomed": r.snomed,
                    "synonyms": list(r.synonyms),
                }
                for r in self.regions
            ],
            "ambiguous": [{"terms": list(terms), "regions": list(cands)} for terms, cands in self.ambiguous],
        }

    @classmethod
    def from_dict(cls, data, source: str | None = None) -> "Taxonomy":
        """Build and validate; RadiographError(source, problem) for anything wrong."""
        if not isinstance(data, dict):
            raise RadiographError(source or "taxonomy", "must be a JSON object with 'name' and 'regions'")
        source = source or f"taxonomy '{data.get('name', '?')}'"
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RadiographError(source, "needs a non-empty string 'name'")
        raw_regions = data.get("regions")
        if not isinstance(raw_regions, list) or not raw_regions:
            raise RadiographError(source, "needs a non-empty list 'regions'")
        regions = tuple(_region_from_dict(r, i, source) for i, r in enumerate(raw_regions))
        ambiguous = tuple(_ambiguous_from_dict(a, i, source) for i, a in enumerate(data.get("ambiguous") or []))
        taxonomy = cls(name.strip(), regions, str(data.get("description") or ""), ambiguous, source)
        if not taxonomy.in_domain:
            raise RadiographError(source, "every region is out_of_domain; at least one must be a body region")
        return taxonomy

    def _build_index(self) -> dict:
        """Normalised words -> (region, candidates), rejecting duplicates and terms in two places."""
        terms, owner, seen = {}, {}, {}
        for region in self.regions:
            folded = region.name.casefold()
            if folded in seen:
                raise RadiographError(self.source, f"region name {region.name!r} appears twice")
            seen[folded] = region.name
            for term in (region.name, *region.body_part_terms, *region.synonyms):
                key = self._term_key(term, f"region {region.name!r}")
                if key in owner and owner[key] != region.name:
                    raise RadiographError(
                        self.source, f"term {term!r} is in two regions: {owner[key]!r} and {region.name!r}"
                    )
                owner[key] = region.name
                terms[key] = (region.name, (region.name,))
        for words, candidates in self.ambiguous:
            for region_name in candidates:
                if region_name.casefold() not in seen:
                    raise RadiographError(
                        self.source,
                        f"ambiguous term {words[0]!r} lists an unknown region "
                        f"{region_name!r} (regions: {', '.join(seen.values())})",
                    )
            candidates = tuple(seen[c.casefold()] for c in candidates)
            for term in words:
                key = self._term_key(term, "the ambiguous terms")
                if key in owner:
                    where = f"also a term of region {owner[key]!r}" if owner[key] else "listed twice"
                    raise RadiographError(self.source, f"ambiguous term {term!r} is {where}")
                owner[key] = None
                terms[key] = (None, candidates)
        return terms

    def _term_key(self, term, where: str) -> tuple:
        key = tuple(normalise(term).split())
        if not key:
            raise RadiographError(self.source, f"empty term {term!r} in {where}")
        if set(key) <= IGNORED_WORDS:
            raise RadiographError(
                self.source, f"term {term!r} in {where} is only laterality/view words, which are ignored in headers"
            )
        return key


def _either(names) -> str:
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def _region_from_dict(raw, i: int, source: str) -> Region:
    where = f"region {i + 1}"
    if not isinstance(raw, dict):
        raise RadiographError(source, f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RadiographError(source, f"{where} needs a non-empty string 'name'")
    where = f"region {name!r}"
    unknown = set(raw) - _REGION_KEYS
    if unknown:
        raise RadiographError(
            source, f"{where} has unknown key(s) {sorted(unknown)} (allowed: {', '.join(sorted(_REGION_KEYS))})"
        )
    if "|" in name:
        raise RadiographError(source, f"{where}: '|' separates labels in CSV files and cannot be in a name")
    out_of_domain = raw.get("out_of_domain", False)
    if not isinstance(out_of_domain, bool):
        raise RadiographError(source, f"{where}: out_of_domain must be true or false")
    body_part_terms = _strings(raw.get("body_part_terms"), f"{where}: body_part_terms", source)
    for term in body_part_terms:
        if not _BODY_PART_TERM.match(term):
            raise RadiographError(
                source,
                f"{where}: body part term {term!r} is not a DICOM defined term "
                "(upper case letters, digits, '_' or space, at most 16 characters)",
            )
    snomed = raw.get("snomed")
    if snomed is not None:
        snomed = str(snomed)
        if not re.fullmatch(r"\d{6,18}", snomed):
            raise RadiographError(source, f"{where}: snomed {snomed!r} is not a SNOMED CT concept id (6-18 digits)")
    return Region(
        name.strip(),
        str(raw.get("description") or ""),
        out_of_domain,
        body_part_terms,
        snomed,
        _strings(raw.get("synonyms"), f"{where}: synonyms", source),
    )


def _ambiguous_from_dict(raw, i: int, source: str) -> tuple:
    where = f"ambiguous entry {i + 1}"
    if not isinstance(raw, dict) or set(raw) - {"terms", "regions"}:
        raise RadiographError(source, f"{where} must be an object with 'terms' and 'regions' only")
    terms = _strings(raw.get("terms"), f"{where}: terms", source)
    regions = _strings(raw.get("regions"), f"{where}: regions", source)
    if not terms or len(regions) < 2:
        raise RadiographError(
            source, f"{where} needs terms and at least two regions (a term that means one region is a synonym)"
        )
    return terms, regions


def _strings(value, where: str, source: str) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RadiographError(source, f"{where} must be a list of strings")
    return tuple(dict.fromkeys(v.strip() for v in value))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> Taxonomy:
    return _load_file(BUILTIN_DIR / f"{name}.json")


def _load_file(path: Path) -> Taxonomy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RadiographError(path, f"cannot read taxonomy file ({error.__class__.__name__}: {error})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # PyYAML comes with MONAI Label

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise RadiographError(path, f"not valid YAML: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RadiographError(path, f"not valid JSON: {error}") from None
    return Taxonomy.from_dict(data, source=str(path))


def load_taxonomy(name_or_path="unifesp22") -> Taxonomy:
    """A built-in taxonomy by name (unifesp22, paper14), a JSON/YAML file, or a Taxonomy (returned as is)."""
    if isinstance(name_or_path, Taxonomy):
        return name_or_path
    if isinstance(name_or_path, str) and name_or_path in builtin_names():
        return _load_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise RadiographError(
            name_or_path, f"no such taxonomy file, and not a built-in taxonomy ({', '.join(builtin_names())})"
        )
    return _load_file(path)


def body_part_term(region_name: str, taxonomy=None) -> str | None:
    """BodyPartExamined value for a region (first CID 4031 term); None where DICOM defines none (Others, Sinus).

    Without a taxonomy the built-ins are searched (unifesp22 first).
    """
    if taxonomy is not None:
        return load_taxonomy(taxonomy).body_part_term(region_name)
    for name in ("unifesp22", *[n for n in builtin_names() if n != "unifesp22"]):
        try:
            return load_taxonomy(name).body_part_term(region_name)
        except KeyError:
            continue
    raise KeyError(f"{region_name!r} is not a region of any built-in taxonomy ({', '.join(builtin_names())})")
