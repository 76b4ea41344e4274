# The image every freshrec process in docker-compose.yml runs from.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY freshrec freshrec
COPY ranking ranking
COPY models models
COPY stores stores
COPY streams streams
COPY learner learner
COPY indexer indexer
COPY serving serving
COPY collector collector
COPY monitor monitor
COPY evaluation evaluation
COPY console console
# Production images target GPU hosts: PyPI's Linux torch wheel is the CUDA build, and the
# gpu extra brings onnxruntime-gpu and a CUDA faiss (the base dependencies have neither
# back end, so only one of each is installed). The image still runs on CPU-only hosts
# (int8 encoder, CPU index); a smaller CPU image: --build-arg FRESHREC_EXTRA=cpu.
ARG FRESHREC_EXTRA=gpu
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir ".[${FRESHREC_EXTRA}]"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CMD ["freshrec", "--help"]
