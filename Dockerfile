# One image for the API, every worker, beat and the simulator; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# The source tree wins over the installed copy for every entrypoint (the `kling` script too),
# so `migrations/`, which is not a package, is found next to `workers/`.
ENV PYTHONPATH=/app
WORKDIR /app

COPY pyproject.toml README.md ./
COPY config ./config
COPY api ./api
COPY workers ./workers
COPY migrations ./migrations
COPY sandbox ./sandbox
COPY clients/python ./clients/python
# The producers' client (not on any index): the `kling` CLI is built on it.
RUN pip install ./clients/python '.[sandbox]' && useradd --system --uid 10001 kling
USER kling

EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
