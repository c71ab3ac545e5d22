"""The batch model catalog: lookups, the closest-id error, Region checks, the quota key, README."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.catalog import resolve_batch_model
from emulator.exceptions import ValidationException
from tasks.bedrock import catalog
from tasks.bedrock.families import families
from tasks.errors import InvalidOptionsError, UnknownModelError

SONNET_45 = "anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.mark.parametrize(
    "written",
    [
        SONNET_45,
        "us." + SONNET_45,
        "global." + SONNET_45,
        f"arn:aws:bedrock:us-east-1::foundation-model/{SONNET_45}",
        f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.{SONNET_45}",
    ],
)
def test_lookup_accepts_profile_prefixes_and_arns(written):
    assert catalog.lookup(written).model_id == SONNET_45


def test_lookup_unknown_id_lists_the_closest_known_ids():
    with pytest.raises(UnknownModelError) as exc:
        catalog.lookup("anthropic.claude-sonet-4-5-20250929-v1:0")
    assert "Closest known ids: anthropic.claude-sonnet-4-5-20250929-v1:0" in str(exc.value)


def test_catalog_families_are_all_registered():
    registered = {f.name for f in families()}
    assert {entry.family for entry in catalog.MODELS} <= registered


def test_catalog_embedding_entries_have_a_default_dimension_they_allow():
    for entry in catalog.MODELS:
        if entry.is_embedding:
            assert entry.default_dimension in entry.dimensions, entry.model_id


@pytest.mark.parametrize(
    "model_id",
    ["us.amazon.nova-pro-v1:0", "amazon.nova-pro-v1:0", "global.amazon.nova-pro-v1:0"],
)
def test_quota_key_counts_profiles_against_the_base_model(model_id):
    assert catalog.quota_key(model_id) == "amazon.nova-pro-v1:0"


@pytest.mark.parametrize(
    "model_id",
    [
        "amazon.nova-premier-v1:0",
        "amazon.nova-2-lite-v1:0",
        "meta.llama4-scout-17b-instruct-v1:0",
    ],
)
def test_check_batch_region_profile_only_model_with_plain_id_is_refused(model_id):
    with pytest.raises(InvalidOptionsError) as exc:
        catalog.check_batch_region(model_id, "us-east-1")
    message = str(exc.value)
    assert f"Invocation of model ID {model_id} with on-demand throughput isn't supported" in message
    assert "inference profile" in message and f"us.{model_id}" in message


def test_check_batch_region_plain_nova1_id_only_where_it_works():
    assert catalog.check_batch_region("amazon.nova-lite-v1:0", "us-east-1").name == "Nova Lite"
    with pytest.raises(InvalidOptionsError, match="plain id works in: us-east-1, us-gov-west-1"):
        catalog.check_batch_region("amazon.nova-lite-v1:0", "eu-west-1")


def test_check_batch_region_profile_of_another_geography_is_refused():
    assert catalog.check_batch_region("eu.amazon.nova-lite-v1:0", "eu-west-1")
    with pytest.raises(InvalidOptionsError, match="does not serve this Region"):
        catalog.check_batch_region("eu.amazon.nova-lite-v1:0", "us-east-1")


def test_check_batch_region_profile_outside_its_listed_regions_is_refused():
    assert catalog.check_batch_region("us.amazon.nova-premier-v1:0", "us-west-2")
    with pytest.raises(InvalidOptionsError, match="us-east-1, us-east-2, us-west-2"):
        catalog.check_batch_region("global.amazon.nova-premier-v1:0", "eu-west-1")


def test_resolve_batch_model_returns_the_emulator_spec():
    spec = resolve_batch_model("us.anthropic.claude-haiku-4-5-20251001-v1:0", "us-east-1")
    assert spec.model_id == "anthropic.claude-haiku-4-5-20251001-v1:0"
    assert spec.response_model_name == "claude-haiku-4-5-20251001"


def test_resolve_batch_model_unknown_id_is_a_validation_exception():
    with pytest.raises(ValidationException) as exc:
        resolve_batch_model("acme.brainy-v1", "us-east-1")
    assert exc.value.code == "ValidationException"
    assert "The provided model identifier 'acme.brainy-v1' is invalid" in exc.value.message


def test_resolve_batch_model_profile_only_plain_id_is_a_validation_exception():
    with pytest.raises(ValidationException) as exc:
        resolve_batch_model("amazon.nova-premier-v1:0", "us-east-1")
    assert "with on-demand throughput isn't supported" in exc.value.message


def test_readme_models_section_matches_the_catalog():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Models\n\n", 1)[1].split("\n### ", 1)[0]
    assert catalog.markdown_table() in section, (
        "README's Models table differs from the catalog: paste the output of "
        "`python -m tasks.bedrock.catalog --markdown` under ### Models."
    )
