# MLflow tracking server with the PostgreSQL driver (the official image does not ship one) and
# the basic-auth app's extras (deploy/compose.yaml starts it with --app-name=basic-auth).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]>=3.17,<4" "psycopg2-binary>=2.9,<3"
EXPOSE 5000
