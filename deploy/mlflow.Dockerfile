# MLflow tracking server with the PostgreSQL driver (the official image does not ship one).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.17,<4" "psycopg2-binary>=2.9,<3"
EXPOSE 5000
