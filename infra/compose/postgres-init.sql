-- One PostgreSQL server, one database per component (MLflow's is created by POSTGRES_DB).
CREATE DATABASE prefect;
CREATE DATABASE optuna;
