-- Runs once, when the Postgres volume is first initialised: MLflow's backend store beside Prefect's
-- database (POSTGRES_DB=prefect), both owned by POSTGRES_USER.
CREATE DATABASE mlflow;
