"""Prompt templates: rendering, literal braces, braces in data, load-time checks."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_series_equal

from prompt_templates import PromptTemplate, check_templates, get_template, prompt_id_to_template
from tasks.errors import TemplateError


def test_render_expr_substitutes_columns_in_order():
    template = PromptTemplate(text="{a} and {b}, again {a}")
    frame = pl.DataFrame({"a": ["x", "y"], "b": [1, 2]})
    rendered = frame.select(template.render_expr().alias("p")).to_series()
    assert_series_equal(rendered, pl.Series("p", ["x and 1, again x", "y and 2, again y"]))
    assert template.columns == ("a", "b")


def test_render_expr_writes_double_braces_as_literal_braces():
    template = PromptTemplate(text='Reply as JSON: {{"k": "{a}"}}')
    rendered = pl.DataFrame({"a": ["v"]}).select(template.render_expr()).item()
    assert rendered == 'Reply as JSON: {"k": "v"}'


def test_render_expr_leaves_braces_in_data_untouched():
    template = PromptTemplate(text="Topic: {topic}")
    data = ["{other}", "{0}", "}{", "{{x}}", "{topic!r:>9}"]
    rendered = pl.DataFrame({"topic": data}).select(template.render_expr()).to_series().to_list()
    assert rendered == [f"Topic: {value}" for value in data]


def test_render_expr_is_null_when_a_value_is_null():
    template = PromptTemplate(text="T: {topic}")
    rendered = pl.DataFrame({"topic": ["a", None]}).select(template.render_expr()).to_series()
    assert rendered.to_list() == ["T: a", None]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{0}", "positional field '{0}'"),
        ("{}", "positional field '{}'"),
        ("{a:>10}", "format spec or conversion in '{a:>10}'"),
        ("{a!r}", "format spec or conversion in '{a!r}'"),
        ("{a.b}", "attribute or index lookup in '{a.b}'"),
        ("{a[0]}", "attribute or index lookup"),
        ("a } b {c}", "bad field syntax"),
        ("{a", "bad field syntax"),
        ("no keys at all", "refers to no column"),
    ],
)
def test_check_templates_rejects_bad_template_naming_its_id(text, needle):
    with pytest.raises(TemplateError) as exc:
        check_templates({"my_template": PromptTemplate(text=text)})
    assert "'my_template'" in str(exc.value)
    assert needle in str(exc.value)


def test_check_templates_accepts_every_shipped_template():
    check_templates(prompt_id_to_template)
    assert {"joke_about_topic", "question_answering", "sentiment"} <= set(prompt_id_to_template)
    assert get_template("joke_about_topic").columns == ("topic",)
    assert get_template("question_answering").columns == ("source",)
    assert get_template("sentiment").columns == ("input_text",)


def test_get_template_unknown_id_lists_known_ids():
    with pytest.raises(TemplateError) as exc:
        get_template("nope")
    message = str(exc.value)
    assert "'nope'" in message
    for known in ("joke_about_topic", "question_answering", "sentiment"):
        assert known in message


def test_inference_params_leaves_out_unset_values():
    template = PromptTemplate(text="{a}", max_tokens=10, stop_sequences=("END",))
    assert template.inference_params() == {"max_tokens": 10, "stop_sequences": ["END"]}
