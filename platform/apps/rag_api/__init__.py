"""rag_api: the tenant's RAG service.

One instance serves exactly one tenant (``TENANT_ID``). It sits behind its Istio sidecar,
which terminates mTLS and verifies the caller's JWT, and it reports what that sidecar
established (``GET /whoami``) so the conformance suite can see who reached whom.

``POST /rag`` answers a question from the tenant's own FAISS index (loaded from S3, see
``rag_api.index``) with a Bedrock model, and keeps the conversation per user and session in
DynamoDB (``rag_api.sessions``); ``python -m rag_api.ingest`` builds and uploads that index.
"""

__version__ = "1.0.0"
