"""A rag-api whose index is missing or corrupt stays out of service and says why."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome
from fixtures.wait import eventually

pytestmark = pytest.mark.standalone_required


@pytest.mark.chaos
def test_corrupt_index_keeps_rag_api_not_ready_with_a_clear_log_line(platform, chat, corpus, tenant, requires):
    requires("faults")
    question = corpus(tenant).questions[0].question
    chat.ask(tenant, question).expect(Outcome.OK)  # control
    with platform.fault("rag-index-corrupt", tenant=tenant.name) as log:
        def logged() -> str:
            lines = [line for line in log.lines() if "index_unavailable" in line]
            assert lines, "no index_unavailable line yet"
            return lines[-1]
        line = eventually(logged, timeout=60, what="rag-api logs why its index is unusable")
        assert "checksum" in line.lower() or "corrupt" in line.lower(), line
        assert f"s3://{tenant.data['documentsBucket']}/{tenant.data['documentsPrefix']}" in line, line
        res = chat.ask(tenant, question)
        assert res.status is not None and res.status >= 500 and res.status != 500, res.describe()
    # Put back: ready and answering again (the fault waits for readiness on exit).
    chat.ask(tenant, question).expect(Outcome.OK)
