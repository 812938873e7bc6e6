"""A split as documents: rows, or WikiText articles as EleutherAI/wikitext_document_level cuts them; the wikitext
task's detokenizer, against lm-evaluation-harness's own function."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clm_runner.config.schema import DataConfig
from clm_runner.data.documents import (
    ARTICLES,
    ROWS,
    WIKITEXT,
    DocumentRule,
    count_words,
    document_rule,
    lines_of,
    split_articles,
    split_documents,
    wikitext_detokenize,
)

# A raw WikiText file's lines (blank lines are one space there), the last one empty: the file ends with "\n".
LINES = [
    " ",
    " = Alpha = ",
    " ",
    " Alpha is a town . ",
    " = = History = = ",
    " It grew @-@ fast .",
    " = = = Early years = = = ",
    " Built in 1 @,@ 200 ( about ) .",
    " = Beta = ",
    " Beta 's river is 3 @.@ 5 km long .",
    " = = = = Deep = = = = ",
    " a = b = c ",
    "= Gamma =",
    " Gamma text .",
    "",
]
# The articles, written out by hand from the rule: a line starts one when, after "= = =" -> "===", "= =" -> "=="
# and stripping, it starts with "= " and ends with " =". Sections (two or more "=" a side, " = = = = Deep"
# included) and "a = b = c" don't; "= Gamma =" does without its spaces. What precedes the first heading is
# white space only, so no article; the last article keeps the final line break.
ARTICLES_BY_HAND = [
    " = Alpha = \n \n Alpha is a town . \n = = History = = \n It grew @-@ fast .\n = = = Early years = = = \n"
    " Built in 1 @,@ 200 ( about ) .",
    " = Beta = \n Beta 's river is 3 @.@ 5 km long .\n = = = = Deep = = = = \n a = b = c ",
    "= Gamma =\n Gamma text .\n",
]
RAW = "\n".join(LINES)


def test_articles_are_cut_at_top_level_headings_only() -> None:
    assert split_articles(LINES) == ARTICLES_BY_HAND


def test_text_before_the_first_heading_is_an_article_when_it_holds_text() -> None:
    assert split_articles(["Preamble.", " = A = ", " a"]) == ["Preamble.", " = A = \n a"]
    assert split_articles(["", "  ", " = A = "]) == [" = A = "]
    assert split_articles(["no heading at all", "at all"]) == ["no heading at all\nat all"]


def test_a_text_file_and_the_hub_wikitext_rows_give_back_the_raw_lines() -> None:
    file_rows = RAW.splitlines(keepends=True)  # datasets' text builder, keep_linebreaks = true
    assert lines_of(file_rows, hub_lines=False, keep_linebreaks=True) == LINES
    stripped = [row.rstrip("\n") for row in file_rows]  # keep_linebreaks = false: the last break is lost
    assert lines_of(stripped, hub_lines=False, keep_linebreaks=False) == LINES[:-1]
    # The hub's `wikitext` rows: a non-blank line with its break, a blank one as "".
    hub_rows = [line + "\n" if line.strip() else "" for line in LINES[:-1]]
    assert lines_of(hub_rows, hub_lines=True, keep_linebreaks=True) == LINES
    # Two text files, the first without a final line break: its last line stays a line of its own.
    two_files = ["a\n", "last", " = B = \n", "b\n"]
    assert lines_of(two_files, hub_lines=False, keep_linebreaks=True) == ["a", "last", " = B = ", "b", ""]


def test_wikitext_documents_score_the_detokenized_article_and_count_the_original() -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    hub_rows = [line + "\n" if line.strip() else "" for line in LINES[:-1]]
    documents = split_documents(hub_rows, DocumentRule(ARTICLES, WIKITEXT, hub_lines=True))
    assert documents.original == ARTICLES_BY_HAND
    assert documents.scored == [wikitext_detokenizer({"page": page}) for page in ARTICLES_BY_HAND]
    counted = [process_results({"page": page}, [0.0]) for page in ARTICLES_BY_HAND]
    assert documents.words == sum(c["word_perplexity"][1] for c in counted)
    assert documents.bytes == sum(c["byte_perplexity"][1] for c in counted)


def test_rows_are_documents_and_null_rows_are_skipped() -> None:
    documents = split_documents(["a b", None, "", " c\n"], DocumentRule(ROWS, None))
    assert documents.original == documents.scored == ["a b", "", " c\n"]
    assert documents.null_rows == 1 and len(documents) == 3
    # lm-eval's count: an empty text is one (empty) word, leading and trailing white space one each.
    assert [count_words(t) for t in documents.original] == [2, 1, 3]
    assert documents.head(2).original == ["a b", ""]


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (DataConfig(dataset_name="wikitext", dataset_config_name="wikitext-2-raw-v1"), (ARTICLES, WIKITEXT)),
        (DataConfig(dataset_name="EleutherAI/wikitext_document_level"), (ROWS, WIKITEXT)),
        (DataConfig(dataset_name="roneneldan/TinyStories"), (ROWS, None)),
        (DataConfig(validation_file="{dir}/v.txt"), (ARTICLES, None)),
        (DataConfig(validation_file="{dir}/v.jsonl"), (ROWS, None)),
        (DataConfig(train_file="{dir}/v.txt"), (ARTICLES, None)),  # validation carved from a text file
        (DataConfig(train_file="{dir}/v.jsonl"), (ROWS, None)),
    ],
)
def test_what_a_document_is(tmp_path, data: DataConfig, rule: tuple[str, str | None]) -> None:
    import dataclasses

    for name in ("v.txt", "v.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n', encoding="utf-8")
    files = {
        key: str(value).format(dir=tmp_path)
        for key in ("train_file", "validation_file")
        if (value := getattr(data, key)) is not None
    }
    found = document_rule(dataclasses.replace(data, **files), "validation")
    assert (found.unit, found.detokenizer) == rule


DETOKENIZER_CASES = [
    " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . \n",
    " = = Career = = \n = = = 2000 @-@ 2005 = = = \n = = = = Deeper = = = = \n",
    " It was 1 @,@ 000 @.@ 5 km long ; the river 's source ( a spring ) is [ 3 ] km away : yes ! \n",
    " He said \" hello there \" and ' quoted ' text { braces } ( nested ( brackets ) ) . \n",
    " The players ' scores were N , N and 20 ° C at 5 ° ; who ? \n",
    " 2 /' 3/ and s 's and ( \n ) ",
]


@pytest.mark.parametrize("text", DETOKENIZER_CASES)
def test_the_detokenizer_equals_lm_evals(text: str) -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    assert wikitext_detokenize(text) == wikitext_detokenizer({"page": text})


FRAGMENTS = [
    " ",
    "\n",
    " \n",
    "=",
    " = ",
    "= =",
    "@-@",
    " @-@ ",
    " @,@ ",
    " @.@ ",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
]
FRAGMENTS += ['"', "'", "s '", " 's", " N ", "°", " ° ", " : ", " ; ", " . ", " , ", " ! ", " ? ", "/' 3/"]
FRAGMENTS += ["a", "word", "1", "Nn"]


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_the_detokenizer_equals_lm_evals_on_any_mix_of_its_patterns(text: str) -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    assert wikitext_detokenize(text) == wikitext_detokenizer({"page": text})


# ---------------------------------------------------------------------------------------------------
# Articles against the builders themselves, on any raw text: EleutherAI/wikitext_document_level's page
# generator, the hub `wikitext` line generator and datasets' text builder, each transcribed from its source
# (the two dataset scripts are on the Hub, not installable; lm-eval ships neither).


def document_level_pages(raw: bytes) -> list[str]:
    """wikitext_document_level.py `_generate_examples`: the file read in text mode, split at "\\n"."""
    with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8") as f:
        data = f.read().split("\n")
    pages, ret = [], []
    for line in data:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(ret)
            if page.strip():
                pages.append(page)
            ret = []
        ret.append(line)
    pages.append("\n".join(ret))
    return pages


def hub_wikitext_rows(raw: bytes) -> list[str]:
    """wikitext.py `_generate_examples` (the hub's `wikitext` rows): each line of the file, "" when blank."""
    with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def text_builder_rows(raw: bytes) -> list[str]:
    """datasets' text builder with keep_linebreaks: the file read in text mode, `StringIO.readlines()`."""
    with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8") as f:
        return io.StringIO(f.read()).readlines()


LINE_PARTS = ["=", "= ", " =", "= =", "= = =", " ", "  ", "\t", "\u3000", "\x0c", "Title", "a b", "@-@", "é"]
RAW_LINES = st.lists(st.lists(st.sampled_from(LINE_PARTS), max_size=6).map("".join), max_size=12)


@given(RAW_LINES, st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_a_text_files_articles_are_the_document_level_pages(
    lines: list[str], newline: str, final_break: bool
) -> None:
    raw = (newline.join(lines) + (newline if final_break else "")).encode("utf-8")
    rows = text_builder_rows(raw)
    assert split_articles(lines_of(rows, hub_lines=False, keep_linebreaks=True)) == document_level_pages(raw)


@given(RAW_LINES, st.booleans())
def test_the_hub_wikitext_rows_give_back_the_document_level_pages(
    lines: list[str], final_break: bool
) -> None:
    """A blank line is " " in WikiText's raw files: the hub keeps it as "", which is read back as " "."""
    lines = [line if line.strip() else " " for line in lines or [""]]
    if not final_break and lines and not lines[-1].strip():
        return  # a last blank line without a break reads back as one with it: the hub kept no trace of either
    raw = ("\n".join(lines) + ("\n" if final_break else "")).encode("utf-8")
    rows = hub_wikitext_rows(raw)
    assert split_articles(lines_of(rows, hub_lines=True, keep_linebreaks=True)) == document_level_pages(raw)
