# cmake -DCOQC=... -DOPM_V=... -DOUT_DIR=... -P check_axioms.cmake
# Compiles opm.v into OUT_DIR and checks that its "Print Assumptions" output
# names only the axioms behind Coq's standard real numbers.
set(allowed
  ClassicalDedekindReals.sig_not_dec
  ClassicalDedekindReals.sig_forall_dec
  FunctionalExtensionality.functional_extensionality_dep)
execute_process(COMMAND "${COQC}" -q -o "${OUT_DIR}/opm.vo" "${OPM_V}"
                WORKING_DIRECTORY "${OUT_DIR}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "coqc failed (${rc}):\n${out}\n${err}")
endif()
if(NOT out MATCHES "Axioms:")
  if(out MATCHES "Closed under the global context")
    message(STATUS "no axioms at all")
    return()
  endif()
  message(FATAL_ERROR "no Print Assumptions output found:\n${out}")
endif()
string(REPLACE "\n" ";" lines "${out}")
set(seen "")
foreach(line IN LISTS lines)
  # axiom names start in column 0; their types continue on indented lines
  if(line MATCHES "^([A-Za-z_][A-Za-z0-9_.']*)")
    set(name "${CMAKE_MATCH_1}")
    if(name STREQUAL "Axioms")
      continue()
    endif()
    list(FIND allowed "${name}" idx)
    if(idx EQUAL -1)
      message(FATAL_ERROR "unexpected assumption: ${line}\nfull output:\n${out}")
    endif()
    list(APPEND seen "${name}")
  endif()
endforeach()
message(STATUS "assumptions: ${seen}")
