"""A split as documents for per-document evaluation: its rows, or WikiText articles; the wikitext task's detokenizer.

lm-evaluation-harness scores each document on its own and counts words and bytes on it, so what a document is
decides the number. Row-based data (jsonl, csv, parquet, arrow, save_to_disk dirs, hub datasets): a row is a
document. Text files and the hub's `wikitext` (whose rows are the lines of the raw files): the lines are cut into
articles as EleutherAI/wikitext_document_level cuts them (see `split_articles`), which is what lm-eval's
`wikitext` task scores. On WikiText (the `wikitext` lines or the document-level pages) the scored text is the
article passed through the task's `wikitext_detokenizer`, while words and bytes are counted on the article itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clm_runner.data.files import file_specs, split_source

if TYPE_CHECKING:
    from clm_runner.config.schema import DataConfig, ModelConfig

WIKITEXT_LINES = ("wikitext", "Salesforce/wikitext")
"""Hub datasets whose rows are the lines of WikiText's raw files (a blank line is an empty row)."""
WIKITEXT_PAGES = ("EleutherAI/wikitext_document_level",)
"""The hub dataset lm-eval's `wikitext` task reads: one WikiText article per row (column `page`)."""

ROWS = "rows"
ARTICLES = "articles"
WIKITEXT = "wikitext"


@dataclass(frozen=True)
class DocumentRule:
    """How a split becomes documents: `unit` is ROWS or ARTICLES; `detokenizer` is WIKITEXT or None."""

    unit: str
    detokenizer: str | None
    hub_lines: bool = False
    """The rows are the hub `wikitext` lines: a blank line is an empty row there, a line of one space in the
    raw file (and in the document-level pages); each other row ends with its line break (a file's last line
    has none when the file does not end with one)."""

    def describe(self) -> str:
        what = "WikiText articles (split at ' = Title = ' lines)" if self.unit == ARTICLES else "rows"
        return what + (", scored through the wikitext task's detokenizer" if self.detokenizer else "")


@dataclass(frozen=True)
class Documents:
    """A split's documents: `scored[i]` is tokenized and scored, `original[i]` is what words and bytes count."""

    scored: list[str]
    original: list[str]
    rule: DocumentRule
    null_rows: int = 0
    """Rows whose text is null (a missing value): skipped, as if they were not there."""

    def __len__(self) -> int:
        return len(self.original)

    @property
    def words(self) -> int:
        return sum(count_words(text) for text in self.original)

    @property
    def bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.original)

    def head(self, n: int | None) -> Documents:
        """The first `n` documents (all of them for None)."""
        if n is None or n >= len(self):
            return self
        return Documents(self.scored[:n], self.original[:n], self.rule, self.null_rows)


def count_words(text: str) -> int:
    """lm-eval's word count: `len(re.split(r"\\s+", text))`, so leading or trailing white space (a WikiText
    article starts with a space) and an empty text each count one empty word, as they do there."""
    return len(re.split(r"\s+", text))


def document_rule(data: DataConfig, split: str) -> DocumentRule:
    """What a document is for `split` of this [data] (a mix's source passes its own [data])."""
    if data.dataset_name in WIKITEXT_LINES:
        return DocumentRule(ARTICLES, WIKITEXT, hub_lines=True)
    if data.dataset_name in WIKITEXT_PAGES:
        return DocumentRule(ROWS, WIKITEXT)
    if data.dataset_name is not None:
        return DocumentRule(ROWS, None)
    specs = file_specs(data)
    # A split with no file of its own is carved from train's rows (or is a save_to_disk dict's split).
    spec = specs.get(split, specs.get("train"))
    if spec is not None and split_source(split, spec).builder == "text":
        return DocumentRule(ARTICLES, None)
    return DocumentRule(ROWS, None)


def split_documents(
    rows: Sequence[str | None], rule: DocumentRule, *, keep_linebreaks: bool = True
) -> Documents:
    """The documents of a split whose text column holds `rows`."""
    if rule.unit == ROWS:
        original = [row for row in rows if row is not None]
        null_rows = len(rows) - len(original)
    else:
        original = split_articles(lines_of(rows, hub_lines=rule.hub_lines, keep_linebreaks=keep_linebreaks))
        null_rows = 0
    scored = [wikitext_detokenize(text) for text in original] if rule.detokenizer == WIKITEXT else original
    return Documents(scored=scored, original=original, rule=rule, null_rows=null_rows)


def lines_of(rows: Sequence[str | None], *, hub_lines: bool, keep_linebreaks: bool) -> list[str]:
    """The lines of the text the rows were read from, as `text.split("\\n")` gives them.

    A text file's rows are its lines, each with its line break unless data.keep_linebreaks is off (then the
    text's last line break is unknown and taken as absent); a row is one line even where a file's last line
    has no break, so several files never run together. The hub's `wikitext` rows are the raw file's lines
    with their breaks, except that a blank line (" " in the raw file) is an empty row.
    """
    present = [row for row in rows if row is not None]
    if hub_lines:
        lines = [row.removesuffix("\n") if row else " " for row in present]
        # A file that ends with a line break has an empty last line after it; a last row without its break
        # was the file's last line. (A blank last row is taken as " \n": the hub kept no trace of its break.)
        if not present or not present[-1] or present[-1].endswith("\n"):
            lines.append("")
        return lines
    lines = [row.removesuffix("\n") for row in present]
    if keep_linebreaks and present and present[-1].endswith("\n"):
        lines.append("")
    return lines


def split_articles(lines: Iterable[str]) -> list[str]:
    """WikiText articles, as EleutherAI/wikitext_document_level builds its pages from a raw file's lines.

    A line starts a new article when, after "= = =" -> "===" and then "= =" -> "==" and stripping, it starts
    with "= " and ends with " =": a top-level heading (" = Title = "), never a section (" = = Part = = ").
    An article is its lines joined by "\\n", heading first. What precedes the first heading is an article only
    if it holds more than white space; the last article is kept whatever it holds.
    """
    articles: list[str] = []
    current: list[str] = []
    for line in lines:
        folded = line.replace("= = =", "===").replace("= =", "==").strip()
        if folded.startswith("= ") and folded.endswith(" ="):
            article = "\n".join(current)
            if article.strip():
                articles.append(article)
            current = []
        current.append(line)
    articles.append("\n".join(current))
    return articles


# lm-eval's `wikitext_detokenizer` (lm_eval/tasks/wikitext/preprocess_wikitext.py, 0.4.x), step by step in its
# order: each step is (regex, replacement) or (plain text, replacement). Later steps see earlier steps' output.
_DETOKENIZER_STEPS: tuple[tuple[str, str, bool], ...] = (
    # contractions
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    # number separators
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    # punctuation
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    # brackets and quotes: white space inside them removed
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    # headings and the rest
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)
_COMPILED_STEPS: tuple[tuple[Any, str, bool], ...] = tuple(
    (re.compile(pattern) if is_regex else pattern, replacement, is_regex)
    for pattern, replacement, is_regex in _DETOKENIZER_STEPS
)


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenized raw text as lm-eval's `wikitext` task scores it (its `wikitext_detokenizer`)."""
    for pattern, replacement, is_regex in _COMPILED_STEPS:
        text = pattern.sub(replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def load_documents(data: DataConfig, model: ModelConfig, split: str, *, progress: bool = True) -> Documents:
    """The documents of one split of this [data] (a plain one: a mix's source or shared split passes its own),
    the first data.max_eval_samples of them when that is set."""
    from clm_runner.data.columns import resolve_text_column
    from clm_runner.data.sources import load_raw_splits

    raw = load_raw_splits(data, model, [split], progress=progress)[split]
    column = resolve_text_column(raw, data.text_column)
    rows = raw.with_format("arrow")[column].to_pylist()
    documents = split_documents(rows, document_rule(data, split), keep_linebreaks=data.keep_linebreaks)
    return documents.head(data.max_eval_samples)
