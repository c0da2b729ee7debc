"""A source made of many shards (data.sources[].path a list or a glob of prefixes) gives the samples
of one prefix holding the same documents in the same order, through Megatron-Core's own
BlendedMegatronDatasetBuilder and GPTDataset: training and validation, alone and in a blend with
another source. Bad shard settings are one ConfigError naming the setting or the file."""

from __future__ import annotations

import random

import pytest

from helpers import gpt_samples, write_indexed
from phi4.data.blend import GptFormat, check_sources
from phi4.data.chat import PackedChatFormat
from phi4.errors import ConfigError
from phi4.settings import Source

VOCAB = 100352
CODE_IDS = range(50000, VOCAB)  # the code source's ids: a sample's source is known by its tokens


def _documents(count: int, seed: int, ids: range) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(ids) for _ in range(rng.randrange(3, 90))] for _ in range(count)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """web: 90 documents as one prefix, and the same in 3 shards named so that their text order
    (web_1, web_10, web_2) is not their order; code: 40 documents of other ids, one prefix."""
    root = tmp_path_factory.mktemp("shards")
    web, code = _documents(90, 1, range(CODE_IDS.start)), _documents(40, 2, CODE_IDS)
    write_indexed(root / "one" / "web", web)
    for name, part in (("web_1", web[:25]), ("web_2", web[25:70]), ("web_10", web[70:])):
        write_indexed(root / "sharded" / name, part)
    write_indexed(root / "code", code)
    return root


def test_three_shards_give_the_samples_of_one_prefix(corpora, tmp_path):
    one = gpt_samples([Source(name="web", path=str(corpora / "one" / "web"), weight=1.0)], tmp_path / "a")
    as_glob = gpt_samples([Source(name="web", path=str(corpora / "sharded" / "web_*"), weight=1.0)], tmp_path / "b")
    as_list = gpt_samples([Source(name="web", path=[str(corpora / "sharded" / n) for n in ("web_1", "web_2", "web_10")],
                               weight=1.0)], tmp_path / "c")
    assert len(one[0]) >= 120 and len(one[1]) >= 1
    assert as_glob == one and as_list == one
    # the shards' text order is another dataset: the comparison can tell
    lexical = gpt_samples([Source(name="web", path=[str(corpora / "sharded" / n) for n in ("web_1", "web_10", "web_2")],
                               weight=1.0)], tmp_path / "d")
    assert lexical[0] != one[0]


def test_a_blend_is_unchanged_by_how_a_source_was_sharded(corpora, tmp_path):
    code = Source(name="code", path=str(corpora / "code"), weight=1.0)
    one = gpt_samples([Source(name="web", path=str(corpora / "one" / "web"), weight=3.0), code], tmp_path / "a")
    sharded = gpt_samples([Source(name="web", path=str(corpora / "sharded" / "web_*"), weight=3.0), code], tmp_path / "b")
    assert sharded == one
    share = sum(row[0] in CODE_IDS for row in one[0]) / len(one[0])
    assert share == pytest.approx(1 / 4, abs=0.01)  # the weights hold over the source, not over each shard


def test_bad_shard_settings_name_the_setting_or_the_file(corpora, tmp_path):
    def refused(path, fmt_check=check_sources) -> str:
        with pytest.raises(ConfigError) as caught:
            fmt_check([Source(name="web", path=path, weight=1.0)])
        return str(caught.value)

    sharded = corpora / "sharded"
    assert refused(f"{tmp_path}/none_*") == (f"data.sources.web.path: {tmp_path}/none_* matches no indexed dataset "
                                             f"({tmp_path}/none_*.idx); make the shards with "
                                             f"`phi4-data preprocess --output-prefix PATH`")
    assert refused([]).startswith("data.sources.web.path: an empty list;")
    assert refused([str(sharded / "web_1"), 3]).startswith("data.sources.web.path: 3 is not a path prefix;")
    assert refused([str(sharded / "web_*"), str(sharded / "web_2")]) == (
        f"data.sources.web.path: {sharded}/web_2 is named twice (a shard's documents would be read twice)")
    assert refused([str(sharded / "web_1"), str(tmp_path / "web_9")]) == (
        f"data.sources.web: {tmp_path}/web_9.bin and .idx not found; make it with "
        f"`phi4-data preprocess --output-prefix PATH`")
    # the packed formats read one prefix a source
    with pytest.raises(ConfigError, match=r"^data.sources.chat.path=.*: this data.format takes one prefix a source; "
                                          r"a list or glob of shards is for data.format=gpt$"):
        PackedChatFormat().check_files(None, [Source(name="chat", path=[str(sharded / "web_1")], weight=1.0)], VOCAB)
    # each shard's ids are checked, and the message names the shard
    write_indexed(tmp_path / "bad" / "web_1", [[1, 2, 3]])
    write_indexed(tmp_path / "bad" / "web_2", [[4, VOCAB, 5]])
    with pytest.raises(ConfigError, match=rf"^data.sources.web: {tmp_path}/bad/web_2.bin holds token id {VOCAB},"):
        GptFormat().check_files(None, [Source(name="web", path=f"{tmp_path}/bad/web_*", weight=1.0)], VOCAB)
