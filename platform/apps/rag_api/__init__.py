"""rag_api: the tenant's RAG service.

One instance serves exactly one tenant (``TENANT_ID``). It sits behind its Istio sidecar,
which terminates mTLS and verifies the caller's JWT, and it reports what that sidecar
established (``GET /whoami``) so the conformance suite can see who reached whom.
"""

__version__ = "1.0.0"
