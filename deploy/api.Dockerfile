# The deepclick API image: the same package the CLI runs, started as `deepclick serve`.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deepclick deepclick
COPY pipelines pipelines
COPY models models
COPY candidates candidates
COPY serving serving
COPY airflow_dags airflow_dags
RUN pip install --no-cache-dir .
EXPOSE 8080
CMD ["deepclick", "serve"]
