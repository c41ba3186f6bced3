# One image for the API, the worker and the migrations step.
# GPU workers: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
RUN pip install "torch>=2.4" --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md alembic.ini ./
COPY b4m_core ./b4m_core
COPY b4m_contract ./b4m_contract
COPY b4m_client ./b4m_client
COPY services ./services
COPY migrations ./migrations
RUN pip install ".[service]"
EXPOSE 8000
CMD ["b4m", "serve", "--host", "0.0.0.0", "--port", "8000"]
