"""Each tenant may use only the models on its own list.

A provisioned model named after a tenant (``.../provisioned-model/<tenant>-...``) is that
tenant's: paid for by it and possibly tuned on its data. That ownership comes from the
model's name, not from the tenants' lists, so a list widened by mistake is caught.
"""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, Tenant
from suites.rag.conftest import CallLog, new_session

pytestmark = pytest.mark.standalone_required


def owned_models(tenant: Tenant) -> list[str]:
    """The provisioned models named after ``tenant`` among those it lists."""
    return [m for m in tenant.listed("llmModels")
            if m.rsplit("/", 1)[-1].startswith(f"{tenant.name}-") and ":provisioned-model/" in m]


def test_every_allowed_model_answers(platform, chat, corpus, tenant):
    question = corpus(tenant).questions[0].question
    allowed = tenant.listed("llmModels")
    assert allowed, f"{tenant} lists no LLM model"
    for model in allowed:
        res = chat.ask(tenant, question, llm_model=model).expect(Outcome.OK)
        assert res.json()["llm_model"] == model, res.describe()
    # No model given: the first on the list.
    assert chat.ask(tenant, question).expect(Outcome.OK).json()["llm_model"] == allowed[0]


def test_other_tenants_exclusive_model_is_refused(platform, chat, corpus, cross_tenant_pair):
    src, dst = cross_tenant_pair
    theirs = owned_models(dst)
    assert theirs, f"{dst} owns no provisioned model (…/provisioned-model/{dst.name}-…): nothing to check"
    for model in theirs:
        # Control: the owner can use it.
        chat.ask(dst, corpus(dst).questions[0].question, llm_model=model).expect(Outcome.OK)
        res = chat.ask(src, corpus(src).questions[0].question, llm_model=model)
        assert res.status == 400, f"{src} used {dst}'s model {model}: {res.describe()}"
        assert "not allowed" in res.json()["detail"], res.describe()


def test_refused_model_never_reaches_bedrock(platform, chat, corpus, cross_tenant_pair, requires):
    requires("llm-call-log")
    src, dst = cross_tenant_pair
    model = owned_models(dst)[0]
    log = CallLog(platform)
    session = new_session()
    assert chat.ask(src, corpus(src).questions[0].question, session, llm_model=model).status == 400
    assert [c for c in log.since() if c["model"] == model] == []
    # The refused question left nothing in the session either.
    assert chat.history(src, session) == []


@pytest.mark.parametrize("field,value", [
    ("llm_model", "anthropic.claude-v2"),  # a real Bedrock id no tenant lists
    ("llm_model", ""),
    ("embedding_model", "text-embedding-3-large"),
    ("embedding_model", "all-MiniLM-L6-v2 "),
])
def test_models_outside_the_list_are_refused(chat, corpus, tenant, field, value):
    res = chat.ask(tenant, corpus(tenant).questions[0].question, **{field: value})
    assert res.status in (400, 422), res.describe()
